package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"iapd/internal/logkey"
	"iapd/policy"
)

// Defaults of Config.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 30 * time.Second
	DefaultMaxHeaderBytes   = 64 << 10
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
	// IdleTimeout closes a connection on which no byte has moved either
	// way for this long: tunnels and pooled HTTP upstream connections. It
	// also shortens the idle timeouts of HTTP keep-alive connections on
	// both sides to at most this. Zero or less keeps idle connections open.
	IdleTimeout time.Duration
	// MaxHeaderBytes caps an HTTP request line and headers; a larger
	// request gets 431. Default 64 KiB.
	MaxHeaderBytes int
	// AuthFailureDelay is how long the next login of a user name from a
	// client address waits after a failed one. It doubles with each
	// further failure, up to 16 times. Zero or less turns the delay off.
	AuthFailureDelay time.Duration
	// IsHostAddr reports whether an address belongs to one of the host's
	// interfaces, which an app may reach only when it allows local
	// targets. It is called on every dial and must be fast. Nil reads the
	// host's addresses from the system at most every 2 seconds.
	IsHostAddr func(netip.Addr) bool
	// OnClose, if set, is called once for every connection as it leaves the
	// table, with its final byte counts. It must not block.
	OnClose func(ConnInfo)
	// OnDialAttempt, if set, is called after every attempt to reach a
	// target through one access point, and once with an empty AccessPoint
	// when no access point of the destination was usable. It must not
	// block.
	OnDialAttempt func(DialAttempt)
}

// DialAttempt is the outcome of one attempt to reach a target.
type DialAttempt struct {
	App         string
	Destination string
	AccessPoint string // empty when no access point was usable
	Target      string
	Duration    time.Duration // resolving and connecting
	Err         *DialError    // nil when the attempt connected
}

// Server runs the front ends of the policy's listeners and keeps the table
// of live connections. It is safe for concurrent use; create it with
// NewServer.
type Server struct {
	cfg    Config
	logger *slog.Logger

	ctx    context.Context // cancelled by Close, which stops dials in progress
	cancel context.CancelFunc

	table   table
	conns   sync.WaitGroup // one per accepted connection until its front end returns, and one per relay
	sweeps  sync.WaitGroup // the idle sweep, until ctx ends
	workers workerPool
	auth    *authThrottle
	stats   stats

	// limits holds the timeouts and sizes of Config, which SetLimits
	// replaces when the policy is reloaded; limitsChanged then wakes the
	// idle sweep, whose period follows the idle timeout.
	limits        atomic.Pointer[policy.Limits]
	limitsChanged chan struct{}

	mu        sync.Mutex
	closed    bool                             // guarded by mu
	draining  bool                             // guarded by mu; set by Shutdown, which stops all accepting
	listeners map[net.Listener]*servedListener // guarded by mu
	clients   map[net.Conn]*servedListener     // guarded by mu; accepted connections still being served, and their listeners
	frontends map[*frontend]struct{}           // guarded by mu; front ends not yet closed
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
	if cfg.IsHostAddr == nil {
		cfg.IsHostAddr = new(hostAddrs).has
	}

	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg:           cfg,
		logger:        cfg.Logger.With(logkey.Component, "proxy"),
		ctx:           ctx,
		cancel:        cancel,
		auth:          newAuthThrottle(),
		limitsChanged: make(chan struct{}, 1),
		listeners:     make(map[net.Listener]*servedListener),
		clients:       make(map[net.Conn]*servedListener),
		frontends:     make(map[*frontend]struct{}),
	}
	s.SetLimits(policy.Limits{
		HandshakeTimeout: cfg.HandshakeTimeout,
		DialTimeout:      cfg.DialTimeout,
		IdleTimeout:      cfg.IdleTimeout,
		MaxHeaderBytes:   cfg.MaxHeaderBytes,
		AuthFailureDelay: cfg.AuthFailureDelay,
	})
	s.sweeps.Add(1)
	go s.sweepIdle()
	return s
}

// SetLimits replaces the timeouts and sizes that Config set, as for a
// reloaded policy, with zero fields taking the defaults of Config. Dials
// and handshakes that started before keep their deadlines; an HTTP front
// end takes the new header size and idle timeouts when Update replaces it.
func (s *Server) SetLimits(l policy.Limits) {
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if l.DialTimeout <= 0 {
		l.DialTimeout = DefaultDialTimeout
	}
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	l.IdleTimeout = max(l.IdleTimeout, 0)
	l.AuthFailureDelay = max(l.AuthFailureDelay, 0)
	s.limits.Store(&l)
	s.auth.setBase(l.AuthFailureDelay)
	select {
	case s.limitsChanged <- struct{}{}:
	default: // a wake-up is pending already
	}
}

// currentLimits returns the limits in force.
func (s *Server) currentLimits() *policy.Limits { return s.limits.Load() }

// Serve accepts connections on ln and serves each with the front end of
// l.Protocol. It blocks until ln fails, Retire retires it, or the server
// shuts down or closes, and returns nil in the last three cases. Serve
// closes ln before it returns.
func (s *Server) Serve(ln net.Listener, l *policy.Listener) error {
	defer ln.Close()
	fe, err := s.newFrontend(l)
	if err != nil {
		return err
	}
	sl := &servedListener{ln: ln}
	sl.cur.Store(fe)
	if !s.addListener(sl) {
		s.releaseFrontend(fe)
		return nil
	}
	defer s.removeListener(ln)

	logger := s.logger.With(logkey.Listener, l.Listen)
	logger.Info("listening", "address", ln.Addr().String(), "protocol", l.Protocol.String(), "max_connections", l.MaxConnections)

	var (
		backoff time.Duration
		full    = newLogLimiter(logger, slog.LevelWarn, "listener full; closing new clients", time.Minute)
		refused = newLogLimiter(logger, slog.LevelInfo, "client address not allowed; closing", time.Minute)
		retry   = newLogLimiter(logger, slog.LevelWarn, "accept failed; retrying", 10*time.Second)
	)
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isStopping() || sl.retired.Load() {
				return nil
			}
			if !isTemporaryAcceptError(err) {
				return fmt.Errorf("accepting on %s: %w", l.Listen, err)
			}
			// Out of file descriptors and the like: wait for some to be
			// released instead of spinning or failing the listener.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.stats.acceptRetries.Add(1)
			retry.log(logkey.Err, err, "retry_in", backoff)
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				s.closeIdleTransports()
			}
			if !s.sleep(backoff) {
				return nil
			}
			continue
		}
		backoff = 0

		// The policy listener of the moment decides, so that a reload
		// changes the client ranges and the cap of an open socket.
		current := sl.cur.Load().l
		client := remoteAddr(c)
		if !current.AllowsClient(client.Addr()) {
			s.stats.clientsRefused.Add(1)
			sl.refused.Add(1)
			refused.log(logkey.Client, client.String())
			c.Close()
			continue
		}
		if current.MaxConnections > 0 && sl.active.Load() >= int64(current.MaxConnections) {
			s.stats.listenerFull.Add(1)
			sl.full.Add(1)
			full.log(logkey.Client, client.String(), "max_connections", current.MaxConnections)
			c.Close()
			continue
		}

		if !s.addClient(c, sl) {
			c.Close()
			return nil
		}
		sl.active.Add(1)
		s.dispatch(handshake{conn: c, fe: sl.acquire(), listener: sl})
	}
}

// isTemporaryAcceptError reports whether an accept failure is worth waiting
// out: the process or the system is out of file descriptors or memory, or
// the kernel says so. See accept(2).
func isTemporaryAcceptError(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, errno) {
			return true
		}
	}
	var te interface{ Temporary() bool }
	return errors.As(err, &te) && te.Temporary()
}

// sleep waits for d and reports false when the server closed first.
func (s *Server) sleep(d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-s.ctx.Done():
		return false
	}
}

// closeIdleTransports closes the idle pooled upstream connections of every
// HTTP front end, which gives file descriptors back when accept ran out.
func (s *Server) closeIdleTransports() {
	s.mu.Lock()
	webs := make([]*httpFrontend, 0, len(s.frontends))
	for fe := range s.frontends {
		if fe.web != nil {
			webs = append(webs, fe.web)
		}
	}
	s.mu.Unlock()
	for _, web := range webs {
		web.closeIdleConnections()
	}
}

// remoteAddr returns the address of c's peer, or the zero AddrPort when it
// is not an IP address.
func remoteAddr(c net.Conn) netip.AddrPort {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	return ap
}

// Update makes the connections that ln accepts from now on follow l, which
// may name other apps, users or another protocol than before. Connections
// already accepted keep the listener they came in on: an HTTP front end
// that is replaced serves its open connections until they end, without
// keep-alive, and then closes. It returns ErrNotServed when ln is not
// being served.
func (s *Server) Update(ln net.Listener, l *policy.Listener) error {
	s.mu.Lock()
	sl, ok := s.listeners[ln]
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("updating %s: %w", l.Listen, ErrNotServed)
	}
	fe, err := s.newFrontend(l)
	if err != nil {
		return err
	}
	old := sl.cur.Swap(fe)
	s.retireFrontend(old)
	return nil
}

// Retire stops accepting on ln and closes it, while the connections it
// accepted go on until they end. Serve then returns nil. It returns
// ErrNotServed when ln is not being served.
func (s *Server) Retire(ln net.Listener) error {
	s.mu.Lock()
	sl, ok := s.listeners[ln]
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("retiring %s: %w", ln.Addr(), ErrNotServed)
	}
	sl.retired.Store(true)
	if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("closing listener %s: %w", ln.Addr(), err)
	}
	s.retireFrontend(sl.cur.Load())
	return nil
}

// ListenerStats is the load of one listener socket: the clients it serves
// now, and the clients it closed at accept since Serve took it. The
// counters only grow, and stay with the socket when Update gives it
// another policy listener.
type ListenerStats struct {
	Connections    int    // clients being served now, counted against max_connections
	ClientsRefused uint64 // closed at accept: address outside allow_clients
	ListenerFull   uint64 // closed at accept: listener at its max_connections
}

// ListenerStats returns the counters of ln, and false when ln is not
// being served: before Serve takes it, or after Serve returned.
func (s *Server) ListenerStats(ln net.Listener) (ListenerStats, bool) {
	s.mu.Lock()
	sl, ok := s.listeners[ln]
	s.mu.Unlock()
	if !ok {
		return ListenerStats{}, false
	}
	return ListenerStats{
		Connections:    int(sl.active.Load()),
		ClientsRefused: sl.refused.Load(),
		ListenerFull:   sl.full.Load(),
	}, true
}

// Shutdown stops accepting on every listener and waits until the
// connections already accepted have ended or ctx is done, then closes the
// server as Close does. It returns ctx's error when connections were still
// open.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.draining = true
	served := make([]*servedListener, 0, len(s.listeners))
	for _, sl := range s.listeners {
		served = append(served, sl)
	}
	s.mu.Unlock()

	for _, sl := range served {
		sl.ln.Close()
		s.retireFrontend(sl.cur.Load())
	}

	drained := make(chan struct{})
	go func() {
		s.conns.Wait()
		close(drained)
	}()
	var err error
	select {
	case <-drained:
	case <-ctx.Done():
		err = ctx.Err()
	}
	return errors.Join(err, s.Close())
}

// newFrontend builds the front end of l.
func (s *Server) newFrontend(l *policy.Listener) (*frontend, error) {
	fe := &frontend{l: l}
	switch l.Protocol {
	case policy.ProtocolSOCKS5:
		fe.serve = s.newSOCKS5Frontend(l).serveConn
	case policy.ProtocolHTTP:
		fe.web = s.newHTTPFrontend(l)
		fe.serve = fe.web.serveConn
	case policy.ProtocolMixed:
		web := s.newHTTPFrontend(l)
		socks := s.newSOCKS5Frontend(l)
		fe.web = web
		fe.serve = func(c net.Conn) bool { return s.serveMixed(c, l, socks, web) }
	default:
		return nil, fmt.Errorf("serving %s: unknown protocol %d", l.Listen, l.Protocol)
	}

	s.mu.Lock()
	closed := s.closed
	if !closed {
		s.frontends[fe] = struct{}{}
	}
	s.mu.Unlock()
	if closed {
		fe.close()
	}
	fe.onIdle = func() { s.releaseFrontend(fe) }
	return fe, nil
}

// retireFrontend lets fe finish the connections it serves and close
// afterwards.
func (s *Server) retireFrontend(fe *frontend) {
	if fe.web != nil {
		// Idle keep-alive clients are closed now, busy ones after their
		// response, so that their next request follows the new policy.
		fe.web.srv.SetKeepAlivesEnabled(false)
	}
	fe.retire()
}

// releaseFrontend closes fe and forgets it.
func (s *Server) releaseFrontend(fe *frontend) {
	s.mu.Lock()
	delete(s.frontends, fe)
	s.mu.Unlock()
	if err := fe.close(); err != nil {
		s.logger.Debug("closing front end", logkey.Listener, fe.l.Listen, logkey.Err, err)
	}
}

// servedListener is a listener socket being served and the front end that
// the connections it accepts get.
type servedListener struct {
	ln      net.Listener
	cur     atomic.Pointer[frontend]
	retired atomic.Bool   // set by Retire, so that Serve returns nil
	active  atomic.Int64  // clients of ln being served, against the listener's max_connections
	refused atomic.Uint64 // clients closed at accept for being outside allow_clients
	full    atomic.Uint64 // clients closed at accept because active was at max_connections
}

// acquire returns the current front end, counted as busy with one more
// connection. A front end retired meanwhile may already be closed, so
// acquire then takes the one that replaced it.
func (sl *servedListener) acquire() *frontend {
	for {
		fe := sl.cur.Load()
		if fe.acquire() {
			return fe
		}
	}
}

// frontend serves the connections of one policy listener. A retired front
// end takes no new connections through a servedListener and closes once
// the last of its connections has ended.
type frontend struct {
	l      *policy.Listener
	serve  func(net.Conn) bool // reports whether a relay owns the connection when it returns
	web    *httpFrontend       // the HTTP front end of http and mixed listeners; nil for socks5
	onIdle func()              // called once when retired and idle

	mu      sync.Mutex
	active  int  // guarded by mu; connections being served
	retired bool // guarded by mu
	done    bool // guarded by mu; onIdle has been called
}

func (fe *frontend) acquire() bool {
	fe.mu.Lock()
	defer fe.mu.Unlock()
	if fe.done {
		return false
	}
	fe.active++
	return true
}

func (fe *frontend) release() {
	fe.mu.Lock()
	fe.active--
	idle := fe.retired && fe.active == 0 && !fe.done
	if idle {
		fe.done = true
	}
	fe.mu.Unlock()
	if idle {
		fe.onIdle()
	}
}

func (fe *frontend) retire() {
	fe.mu.Lock()
	fe.retired = true
	idle := fe.active == 0 && !fe.done
	if idle {
		fe.done = true
	}
	fe.mu.Unlock()
	if idle {
		fe.onIdle()
	}
}

// close closes the HTTP front end, if any, with its open connections.
func (fe *frontend) close() error {
	if fe.web == nil {
		return nil
	}
	return fe.web.close()
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
	frontends := make([]*frontend, 0, len(s.frontends))
	for fe := range s.frontends {
		frontends = append(frontends, fe)
	}
	clear(s.frontends)
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
	s.table.closeMatching(func(*upstream) bool { return true }, true, "server closed")
	for _, f := range frontends {
		if err := f.close(); err != nil {
			errs = append(errs, fmt.Errorf("closing HTTP front end: %w", err))
		}
	}

	s.conns.Wait()
	s.sweeps.Wait()
	s.workers.wg.Wait()
	return errors.Join(errs...)
}

// isStopping reports whether the server is shutting down or closed.
func (s *Server) isStopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed || s.draining
}

// addListener registers sl for Close and reports false when the server is
// shutting down or closed already.
func (s *Server) addListener(sl *servedListener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.draining {
		return false
	}
	s.listeners[sl.ln] = sl
	return true
}

func (s *Server) removeListener(ln net.Listener) {
	s.mu.Lock()
	delete(s.listeners, ln)
	s.mu.Unlock()
}

// addClient registers an accepted connection for Close and counts it in
// s.conns, and reports false when the server is closed already. Doing both
// under mu keeps conns.Add from racing with the Wait in Close.
func (s *Server) addClient(c net.Conn, sl *servedListener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.clients[c] = sl
	s.conns.Add(1)
	return true
}

// listenerOf returns the listener that accepted c, which a front end is
// still serving, or nil.
func (s *Server) listenerOf(c net.Conn) *servedListener {
	if p, ok := c.(*peekedConn); ok {
		c = p.Conn
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.clients[c]
}

// removeClient removes c from the set that Close closes once its front
// end has returned. With closeConn, it also closes c, which the front end
// may have left open; without, a relay owns c and ends it.
func (s *Server) removeClient(c net.Conn, closeConn bool) {
	if closeConn {
		c.Close()
	}
	s.mu.Lock()
	delete(s.clients, c)
	s.mu.Unlock()
	s.conns.Done()
}
