package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"iapd/policy"
)

// defaultPolicyPath is the policy file iapd reads without -c.
const defaultPolicyPath = "/etc/iapd/iapd.yaml"

// defaultDrainTimeout bounds how long SIGTERM waits for open connections.
const defaultDrainTimeout = 10 * time.Second

func runCommand(args []string, stderr io.Writer) error {
	fs := newFlagSet("run", stderr)
	path := fs.String("c", defaultPolicyPath, "policy `file` to serve")
	logFormat := fs.String("log-format", "text", "log `format`: text or json")
	logLevel := fs.String("log-level", "info", "log `level`: debug, info, warn or error")
	socket := fs.String("socket", "", "control socket `path`, in place of the policy's control.socket")
	drain := fs.Duration("drain-timeout", defaultDrainTimeout, "on SIGTERM, how long open connections may go on before they are closed")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *drain < 0 {
		return usageError{fmt.Errorf("invalid -drain-timeout %v: must not be negative", *drain)}
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
	hangup := make(chan os.Signal, 1)
	signal.Notify(hangup, syscall.SIGHUP)
	defer signal.Stop(hangup)
	return serve(ctx, pol, daemonOptions{socket: *socket}, *drain, hangup, logger)
}

// serve runs the daemon for pol until ctx ends, reloading the policy on
// every value from hangup. It then stops accepting, lets open connections
// drain for up to drain, closes the rest and removes iapd's routing tables
// and rules.
func serve(ctx context.Context, pol *policy.Policy, opts daemonOptions, drain time.Duration, hangup <-chan os.Signal, logger *slog.Logger) error {
	logger.Info("starting", "version", Version, "policy", pol.Path, "hash", shortHash(pol.Hash))
	d, err := startDaemon(pol, opts, logger)
	if err != nil {
		return err
	}
	logger.Info("ready", "listeners", len(pol.Listeners))
	notifySystemd("READY=1")

wait:
	for {
		select {
		case <-hangup:
			logger.Info("reloading on SIGHUP")
			// Reload logs and publishes its outcome itself.
			d.Reload()
		case <-ctx.Done():
			break wait
		}
	}
	notifySystemd("STOPPING=1")
	logger.Info("stopping")
	d.shutdown(drain)
	logger.Info("stopped")
	return nil
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
