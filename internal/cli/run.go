package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"iapd/iface"
	"iapd/internal/logkey"
	"iapd/policy"
	"iapd/proxy"
)

// defaultPolicyPath is the policy file iapd reads without -c.
const defaultPolicyPath = "/etc/iapd/iapd.yaml"

// shutdownTimeout bounds how long SIGTERM waits for open connections.
const shutdownTimeout = 5 * time.Second

func runCommand(args []string, stderr io.Writer) error {
	fs := newFlagSet("run", stderr)
	path := fs.String("c", defaultPolicyPath, "policy `file` to serve")
	logFormat := fs.String("log-format", "text", "log `format`: text or json")
	logLevel := fs.String("log-level", "info", "log `level`: debug, info, warn or error")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	logger, err := newLogger(stderr, *logFormat, *logLevel)
	if err != nil {
		return err
	}

	pol, err := policy.Load(*path)
	if err != nil {
		printPolicyError(stderr, *path, err)
		return errSilent
	}

	stopPprof, err := startPprof(logger)
	if err != nil {
		return err
	}
	defer stopPprof()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return serve(ctx, pol, logger)
}

// serve runs the daemon for pol until ctx ends, then stops accepting,
// closes open connections and removes iapd's routing tables and rules.
func serve(ctx context.Context, pol *policy.Policy, logger *slog.Logger) error {
	logger.Info("starting", "version", Version, "policy", pol.Path, "hash", pol.Hash[:12])

	links, err := iface.NewManager(iface.ManagerConfig{Policy: pol, Logger: logger})
	if err != nil {
		return fmt.Errorf("setting up interfaces: %w", err)
	}
	defer links.Close()

	srv := proxy.NewServer(proxy.Config{
		Network: newNetwork(pol, links, logger),
		Logger:  logger,
	})

	listeners, err := listen(pol)
	if err != nil {
		srv.Close()
		return err
	}

	var wg sync.WaitGroup
	for i, ln := range listeners {
		l := pol.Listeners[i]
		wg.Go(func() {
			if err := srv.Serve(ln, l); err != nil {
				logger.Error("listener stopped", logkey.Listener, ln.Addr().String(), logkey.Err, err)
			}
		})
	}
	logger.Info("ready", "listeners", len(listeners))
	notifySystemd("READY=1")

	<-ctx.Done()
	notifySystemd("STOPPING=1")
	logger.Info("stopping")
	done := make(chan struct{})
	go func() {
		srv.Close()
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(shutdownTimeout):
		logger.Warn("connections still open at shutdown", "timeout", shutdownTimeout)
	}
	return nil
}

// listen opens every listener before any is served, so that a busy port
// stops the start instead of leaving a half-running daemon.
func listen(pol *policy.Policy) ([]net.Listener, error) {
	var lns []net.Listener
	for _, l := range pol.Listeners {
		ln, err := net.Listen("tcp", l.Listen)
		if err != nil {
			for _, open := range lns {
				open.Close()
			}
			return nil, fmt.Errorf("opening listener %s: %w", l.Listen, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// notifySystemd sends state to the service manager when iapd runs under
// systemd with Type=notify; see sd_notify(3). Without NOTIFY_SOCKET it does
// nothing.
func notifySystemd(state string) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:] // abstract socket namespace
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return
	}
	defer conn.Close()

	// A lost notification only delays systemd's view of the state; the
	// daemon serves either way.
	conn.Write([]byte(state))
}
