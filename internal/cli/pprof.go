package cli

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"time"
)

// pprofEnv names the environment variable that, set to a loopback
// host:port, makes "iapd run" serve Go's profiling handlers there. The
// benchmark uses it; it is not meant for production.
const pprofEnv = "IAPD_PPROF"

// startPprof serves /debug/pprof/ on the loopback address in IAPD_PPROF.
// It returns a stop function, or an error when the address is not
// loopback, because profiles expose memory contents.
func startPprof(logger *slog.Logger) (stop func(), err error) {
	addr := os.Getenv(pprofEnv)
	if addr == "" {
		return func() {}, nil
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, usageError{fmt.Errorf("%s=%q: want a loopback address and port, such as 127.0.0.1:6061", pprofEnv, addr)}
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("opening %s listener: %w", pprofEnv, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	logger.Warn("serving profiles", "address", addr)
	return func() { srv.Close() }, nil
}
