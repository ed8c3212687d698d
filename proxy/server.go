package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"iapd/internal/logkey"
	"iapd/policy"
)

// Defaults of Config.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 30 * time.Second
)

// Config configures a Server.
type Config struct {
	// Network gives the access points' dialers, resolvers and usability.
	// Required.
	Network Network
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// HandshakeTimeout bounds a client's SOCKS5 negotiation or HTTP request
	// headers, from accept until the upstream is dialled. Default 10s.
	HandshakeTimeout time.Duration
	// DialTimeout bounds one dial over all access points tried. Default 30s.
	DialTimeout time.Duration
	// OnClose, if set, is called once for every connection as it leaves the
	// table, with its final byte counts. It must not block.
	OnClose func(ConnInfo)
}

// Server runs the front ends of the policy's listeners and keeps the table
// of live connections. It is safe for concurrent use; create it with
// NewServer.
type Server struct {
	cfg    Config
	logger *slog.Logger

	ctx    context.Context // cancelled by Close, which stops dials in progress
	cancel context.CancelFunc

	table table
	conns sync.WaitGroup // one per accepted connection until its front end returns

	mu        sync.Mutex
	closed    bool                      // guarded by mu
	listeners map[net.Listener]struct{} // guarded by mu
	clients   map[net.Conn]struct{}     // guarded by mu; accepted connections still being served
	// TODO: a front end stays here until Close even after its Serve has
	// returned, so a daemon that re-serves listeners on reload keeps one
	// idle HTTP front end per reload until it exits.
	frontends []*httpFrontend // guarded by mu; closed by Close
}

// NewServer returns a Server that dials through cfg.Network. It panics when
// cfg.Network is nil.
func NewServer(cfg Config) *Server {
	if cfg.Network == nil {
		panic("proxy.NewServer: nil Network")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}

	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		cfg:       cfg,
		logger:    cfg.Logger.With(logkey.Component, "proxy"),
		ctx:       ctx,
		cancel:    cancel,
		listeners: make(map[net.Listener]struct{}),
		clients:   make(map[net.Conn]struct{}),
	}
}

// Serve accepts connections on ln and serves each with the front end of
// l.Protocol. It blocks until ln fails or the server closes, and returns nil
// in the second case. Serve closes ln before it returns.
func (s *Server) Serve(ln net.Listener, l *policy.Listener) error {
	defer ln.Close()
	serve, err := s.frontendFor(l)
	if err != nil {
		return err
	}
	if serve == nil {
		return nil // closed while starting
	}
	if !s.addListener(ln) {
		return nil
	}
	defer s.removeListener(ln)

	logger := s.logger.With(logkey.Listener, l.Listen)
	logger.Info("listening", "address", ln.Addr().String(), "protocol", l.Protocol.String())

	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			var te interface{ Temporary() bool }
			if errors.As(err, &te) && te.Temporary() {
				// Out of file descriptors and the like: wait for some to
				// be released instead of failing the listener.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				logger.Warn("accept failed; retrying", logkey.Err, err, "retry_in", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("accepting on %s: %w", l.Listen, err)
		}
		backoff = 0

		if !s.addClient(c) {
			c.Close()
			return nil
		}
		go func() {
			defer s.removeClient(c)
			serve(c)
		}()
	}
}

// frontendFor returns the function that serves one client of l.
func (s *Server) frontendFor(l *policy.Listener) (func(net.Conn), error) {
	switch l.Protocol {
	case policy.ProtocolSOCKS5:
		return s.newSOCKS5Frontend(l).serveConn, nil
	case policy.ProtocolHTTP:
		web := s.newHTTPFrontend(l)
		if !s.addFrontend(web) {
			return nil, nil
		}
		return web.serveConn, nil
	case policy.ProtocolMixed:
		web := s.newHTTPFrontend(l)
		if !s.addFrontend(web) {
			return nil, nil
		}
		socks := s.newSOCKS5Frontend(l)
		return func(c net.Conn) { s.serveMixed(c, l, socks, web) }, nil
	}
	return nil, fmt.Errorf("serving %s: unknown protocol %d", l.Listen, l.Protocol)
}

// Close stops every listener being served, closes every client and
// upstream connection and the HTTP front ends, and waits for the
// connections' goroutines to end.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	listeners := make([]net.Listener, 0, len(s.listeners))
	for ln := range s.listeners {
		listeners = append(listeners, ln)
	}
	clients := make([]net.Conn, 0, len(s.clients))
	for c := range s.clients {
		clients = append(clients, c)
	}
	frontends := s.frontends
	s.mu.Unlock()

	var errs []error
	for _, ln := range listeners {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("closing listener %s: %w", ln.Addr(), err))
		}
	}
	// Clients go before dials are cancelled, so that no client gets a
	// failure reply for a dial that only the shutdown ended.
	for _, c := range clients {
		c.Close()
	}
	s.cancel()
	s.table.closeMatching(func(*upstream) bool { return true }, true)
	for _, f := range frontends {
		if err := f.close(); err != nil {
			errs = append(errs, fmt.Errorf("closing HTTP front end: %w", err))
		}
	}

	s.conns.Wait()
	return errors.Join(errs...)
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// addListener registers ln for Close and reports false when the server is
// closed already.
func (s *Server) addListener(ln net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.listeners[ln] = struct{}{}
	return true
}

func (s *Server) removeListener(ln net.Listener) {
	s.mu.Lock()
	delete(s.listeners, ln)
	s.mu.Unlock()
}

// addFrontend registers f for Close and reports false, after closing f,
// when the server is closed already.
func (s *Server) addFrontend(f *httpFrontend) bool {
	s.mu.Lock()
	closed := s.closed
	if !closed {
		s.frontends = append(s.frontends, f)
	}
	s.mu.Unlock()

	if closed {
		f.close()
		return false
	}
	return true
}

// addClient registers an accepted connection for Close and counts it in
// s.conns, and reports false when the server is closed already. Doing both
// under mu keeps conns.Add from racing with the Wait in Close.
func (s *Server) addClient(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.clients[c] = struct{}{}
	s.conns.Add(1)
	return true
}

// removeClient closes c, which its front end may have left open, and
// removes it from the set that Close closes.
func (s *Server) removeClient(c net.Conn) {
	c.Close()
	s.mu.Lock()
	delete(s.clients, c)
	s.mu.Unlock()
	s.conns.Done()
}
