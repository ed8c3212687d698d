// Package admin is iapd's control API: JSON over HTTP on a Unix socket for
// the iapd command line (status, connections, explain, reload, events),
// and an optional HTTP listener with Prometheus metrics, a live status page
// and a PAC file. It reads the running daemon through the Daemon interface
// and changes nothing itself except by asking the daemon to reload or to
// close a connection.
package admin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"iapd/iface"
	"iapd/internal/event"
	"iapd/internal/logkey"
	"iapd/policy"
	"iapd/proxy"
)

// Daemon is the view of the running iapd that the control API reads. Its methods are
// called concurrently.
type Daemon interface {
	// Policy returns the policy being served now.
	Policy() *policy.Policy
	// Snapshot returns the current interface state; nil means none known.
	Snapshot() *iface.Snapshot
	// Conditions returns the state of the access points that plans see:
	// whether each is usable and why not, its probe and its hold-down.
	Conditions() policy.Conditions
	// Interface returns the interface ap sends through now.
	Interface(ap *policy.AccessPoint) string
	// ListenerAddr returns the address a policy listener accepts on, with
	// the port the kernel chose for port 0, or "" when it is not open.
	ListenerAddr(l *policy.Listener) string
	// Listeners returns the proxy listeners open now, in the policy's
	// order, and the DNS listeners, by app name. Both follow reloads.
	Listeners() ([]OpenListener, []DNSListenerStatus)
	// Conns returns the live connections, oldest first.
	Conns() []proxy.ConnInfo
	// CloseConn closes the connection with the given ID and reports
	// whether there was one.
	CloseConn(id uint64) bool
	// Reload loads the policy file again and applies it. A policy with
	// problems leaves the running one in place and the error is, or
	// wraps, a policy.ErrorList.
	Reload() (*ReloadReport, error)
}

// OpenListener is a proxy listener of the running policy and its socket.
type OpenListener struct {
	Listener *policy.Listener
	Address  string // bound address, with the port the kernel chose for port 0
	Stats    proxy.ListenerStats
}

// Config configures a Server.
type Config struct {
	Daemon  Daemon     // required
	Bus     *event.Bus // required; streamed by /v1/events
	Version string
	Started time.Time
	Usage   *Usage   // required; byte and connection counts
	Metrics *Metrics // nil serves no /metrics
	Logger  *slog.Logger
}

// Server serves the control API and the HTTP listener. Create it with New;
// it is safe for concurrent use.
type Server struct {
	cfg    Config
	logger *slog.Logger

	done      chan struct{} // closed by Close, which ends event streams
	closeOnce sync.Once

	mu      sync.Mutex     // protects servers
	servers []*http.Server // every server started by Serve
	streams sync.WaitGroup // event streams being served
}

// New returns a Server for cfg. It panics when cfg.Daemon, cfg.Bus or
// cfg.Usage is nil.
func New(cfg Config) *Server {
	if cfg.Daemon == nil || cfg.Bus == nil || cfg.Usage == nil {
		panic("admin.New: nil Daemon, Bus or Usage")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{
		cfg:    cfg,
		logger: cfg.Logger.With(logkey.Component, "admin"),
		done:   make(chan struct{}),
	}
}

// ControlHandler returns the handler of the control socket: the whole API,
// reload and closing connections included. Whoever can open the socket
// may use it, so its file mode is the access control.
func (s *Server) ControlHandler() http.Handler {
	mux := http.NewServeMux()
	s.routeReadOnly(mux)
	mux.HandleFunc("POST /v1/reload", s.handleReload)
	mux.HandleFunc("DELETE /v1/connections/{id}", s.handleCloseConn)
	return mux
}

// WebHandler returns the handler of the HTTP listener: the read-only API,
// /metrics, the status page and /proxy.pac. It answers only requests whose
// Host is an IP address or localhost, so that a web page that rebinds a
// DNS name to the listener's address cannot read it.
func (s *Server) WebHandler() http.Handler {
	mux := http.NewServeMux()
	s.routeReadOnly(mux)
	mux.HandleFunc("POST /v1/reload", s.handleControlOnly)
	mux.HandleFunc("DELETE /v1/connections/{id}", s.handleControlOnly)
	if s.cfg.Metrics != nil {
		mux.Handle("GET /metrics", s.cfg.Metrics.Handler())
	}
	mux.HandleFunc("GET /proxy.pac", s.handlePAC)
	mux.HandleFunc("GET /{$}", s.handlePage)
	mux.Handle("GET /static/", pageAssets())
	return checkHost(mux)
}

func (s *Server) routeReadOnly(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/status", s.handleStatus)
	mux.HandleFunc("GET /v1/interfaces", s.handleInterfaces)
	mux.HandleFunc("GET /v1/access-points", s.handleAccessPoints)
	mux.HandleFunc("GET /v1/destinations", s.handleDestinations)
	mux.HandleFunc("GET /v1/apps", s.handleApps)
	mux.HandleFunc("GET /v1/connections", s.handleConns)
	mux.HandleFunc("GET /v1/explain", s.handleExplain)
	mux.HandleFunc("GET /v1/events", s.handleEvents)
}

// checkHost rejects requests whose Host header names something other than
// an IP address or localhost.
func checkHost(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		if host != "localhost" && net.ParseIP(host) == nil {
			writeError(w, http.StatusMisdirectedRequest, fmt.Errorf("host %q is not an IP address or localhost; use the listener's address", r.Host))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// Serve serves h on ln until Close. It returns nil after Close.
func (s *Server) Serve(ln net.Listener, h http.Handler) error {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.logger.Handler(), slog.LevelDebug),
	}
	s.mu.Lock()
	select {
	case <-s.done:
		s.mu.Unlock()
		ln.Close()
		return nil
	default:
	}
	s.servers = append(s.servers, srv)
	s.mu.Unlock()

	err := srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Close ends the event streams and closes every server that Serve started.
func (s *Server) Close() error {
	s.closeOnce.Do(func() { close(s.done) })
	s.mu.Lock()
	servers := s.servers
	s.servers = nil
	s.mu.Unlock()

	var errs []error
	for _, srv := range servers {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if err := srv.Shutdown(ctx); err != nil {
			errs = append(errs, srv.Close())
		}
		cancel()
	}
	s.streams.Wait()
	return errors.Join(errs...)
}

// Default locations of the control socket.
const (
	systemSocket = "/run/iapd/iapd.sock"
	socketName   = "iapd.sock"
)

// DefaultSocketPath returns where the control socket is when the policy
// names none: in systemd's RuntimeDirectory when the service has one,
// /run/iapd/iapd.sock for root, and $XDG_RUNTIME_DIR/iapd/iapd.sock for
// other users.
func DefaultSocketPath() (string, error) {
	if dir := os.Getenv("RUNTIME_DIRECTORY"); dir != "" {
		// systemd may list several directories, separated by colons.
		first, _, _ := strings.Cut(dir, ":")
		return filepath.Join(first, socketName), nil
	}
	if os.Geteuid() == 0 {
		return systemSocket, nil
	}
	if dir := os.Getenv("XDG_RUNTIME_DIR"); dir != "" {
		return filepath.Join(dir, "iapd", socketName), nil
	}
	if _, err := os.Stat(systemSocket); err == nil {
		return systemSocket, nil
	}
	return "", errors.New("no control socket path: XDG_RUNTIME_DIR is not set; set control.socket in the policy, or IAPD_SOCKET for the command line")
}

// ClientSocketPath returns the control socket that the command line uses
// when none is named: /run/iapd/iapd.sock when it exists, which is where
// the systemd service puts it, else DefaultSocketPath.
func ClientSocketPath() (string, error) {
	if _, err := os.Stat(systemSocket); err == nil {
		return systemSocket, nil
	}
	return DefaultSocketPath()
}

// ListenSocket creates the control socket at path with mode, creating its
// directory when missing and replacing a stale socket that no process
// accepts on. It refuses to replace a socket that another iapd serves.
func ListenSocket(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating control socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("creating control socket: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("creating control socket: another iapd serves %s", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale control socket: %w", err)
		}
	}

	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("creating control socket: %w", err)
	}
	// Listen creates the socket with the process umask; the mode from the
	// policy decides who may control iapd.
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("setting control socket mode: %w", err)
	}
	return ln, nil
}
