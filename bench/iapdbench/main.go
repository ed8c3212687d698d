// Command iapdbench measures iapd on loopback against the same work done
// without a proxy: bulk throughput, connection setup rate, memory per idle
// tunnel, CPU time per gigabyte relayed, and the resolver of package dns.
// Client, sinks and iapd run on one machine and share its cores, so the
// figures compare modes with each other; they are not absolute capacities.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// options are the command-line settings of one run.
type options struct {
	iapdPath string
	outDir   string
	repeat   int
	quick    bool
	ends     string // endsCopy or endsZeroCopy

	directOnly bool
	phases     []string // subset of allPhases, in the order given by allPhases
	peers      string   // "auto", "none" or a comma-separated list of peer names

	bulkMiB       int
	streams       int
	setupDuration time.Duration
	setupWorkers  int
	tunnels       int
	dnsDuration   time.Duration
	dnsWorkers    int

	profileDir      string
	profileDuration time.Duration
	profileMode     string
}

var allPhases = []string{"dns", "bulk", "setup", "memory", "scale"}

// quickSizes are applied by -quick to every size and duration flag that
// the command line does not set itself.
var quickSizes = map[string]string{
	"bulk-mib":         "128",
	"setup-duration":   "1s",
	"tunnels":          "2000",
	"dns-duration":     "500ms",
	"profile-duration": "5s",
}

func main() {
	if mode := os.Getenv(sinkChildEnv); mode != "" {
		os.Exit(runSinkChild(mode))
	}
	if addr := os.Getenv(minimalProxyEnv); addr != "" {
		os.Exit(runMinimalProxy(addr))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	opts, err := parseOptions(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "iapdbench:", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if opts.profileDir != "" {
		err = runProfile(ctx, opts, stderr)
	} else {
		err = runBenchmark(ctx, opts, stdout, stderr)
	}
	if err != nil {
		fmt.Fprintln(stderr, "iapdbench:", err)
		return 1
	}
	return 0
}

func parseOptions(args []string, stderr io.Writer) (*options, error) {
	opts := &options{}
	fs := flag.NewFlagSet("iapdbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: iapdbench [flags]\n\nMeasures iapd on loopback against direct connections. Flags:\n")
		fs.PrintDefaults()
	}

	fs.StringVar(&opts.iapdPath, "iapd", "bin/iapd", "iapd `binary` to start")
	fs.StringVar(&opts.outDir, "out", "bench/out", "`directory` for results.json and results.txt")
	fs.IntVar(&opts.repeat, "repeat", 3, "`runs` of each measure; the table shows their median")
	fs.BoolVar(&opts.quick, "quick", false, "use small sizes and short durations (about 30 s in all) for flags not set explicitly")
	fs.StringVar(&opts.ends, "ends", endsCopy, "how clients and sinks move bulk data: "+endsCopy+" (read(2) and write(2) with 128 KiB buffers) or "+endsZeroCopy+" (sendfile(2) and splice(2))")
	fs.BoolVar(&opts.directOnly, "direct-only", false, "measure only direct connections and the resolver; iapd is not started")
	fs.StringVar(&opts.peers, "peers", "auto", "other SOCKS5 proxies measured beside iapd in the bulk and setup measures: auto (those installed), none, or a comma-separated `list` of "+strings.Join(peerNames(), ", "))
	phases := fs.String("phases", strings.Join(allPhases, ","), "comma-separated `list` of measures to run: "+strings.Join(allPhases, ", "))

	fs.IntVar(&opts.bulkMiB, "bulk-mib", 1024, "MiB moved by each bulk transfer, split evenly across the parallel streams")
	fs.IntVar(&opts.streams, "streams", 8, "parallel `streams` of the parallel bulk transfer")
	fs.DurationVar(&opts.setupDuration, "setup-duration", 5*time.Second, "`duration` of each connection setup run")
	fs.IntVar(&opts.setupWorkers, "setup-workers", 16, "concurrent `workers` opening connections in the setup run")
	fs.IntVar(&opts.tunnels, "tunnels", 10000, "idle SOCKS5 `tunnels` held open for the memory measure")
	fs.DurationVar(&opts.dnsDuration, "dns-duration", 2*time.Second, "`duration` of each resolver run")
	fs.IntVar(&opts.dnsWorkers, "dns-workers", 16, "concurrent `workers` resolving names in the resolver run")

	fs.StringVar(&opts.profileDir, "profile", "", "instead of measuring, save iapd's CPU and allocation profiles of the bulk and setup workloads into `directory`")
	fs.DurationVar(&opts.profileDuration, "profile-duration", 10*time.Second, "`duration` of each CPU profile")
	fs.StringVar(&opts.profileMode, "profile-mode", "socks5", "proxy `mode` the profiled workloads use: socks5, socks5-auth or http")

	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: iapdbench takes only flags", fs.Arg(0))
	}

	if opts.quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, value := range quickSizes {
			if !set[name] {
				if err := fs.Set(name, value); err != nil {
					return nil, fmt.Errorf("applying -quick to -%s: %w", name, err)
				}
			}
		}
	}

	var err error
	if opts.phases, err = parsePhases(*phases); err != nil {
		return nil, err
	}
	return opts, validateOptions(opts)
}

func parsePhases(list string) ([]string, error) {
	chosen := map[string]bool{}
	for p := range strings.SplitSeq(list, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if !slices.Contains(allPhases, p) {
			return nil, fmt.Errorf("invalid -phases entry %q: use %s", p, strings.Join(allPhases, ", "))
		}
		chosen[p] = true
	}
	if len(chosen) == 0 {
		return nil, fmt.Errorf("-phases is empty: name at least one of %s", strings.Join(allPhases, ", "))
	}
	var phases []string
	for _, p := range allPhases {
		if chosen[p] {
			phases = append(phases, p)
		}
	}
	return phases, nil
}

func validateOptions(o *options) error {
	positive := []struct {
		name  string
		value int64
	}{
		{"repeat", int64(o.repeat)},
		{"bulk-mib", int64(o.bulkMiB)},
		{"streams", int64(o.streams)},
		{"setup-duration", int64(o.setupDuration)},
		{"setup-workers", int64(o.setupWorkers)},
		{"tunnels", int64(o.tunnels)},
		{"dns-duration", int64(o.dnsDuration)},
		{"dns-workers", int64(o.dnsWorkers)},
		{"profile-duration", int64(o.profileDuration)},
	}
	for _, p := range positive {
		if p.value <= 0 {
			return fmt.Errorf("invalid -%s: must be above zero", p.name)
		}
	}
	if o.ends != endsCopy && o.ends != endsZeroCopy {
		return fmt.Errorf("invalid -ends %q: use %s or %s", o.ends, endsCopy, endsZeroCopy)
	}
	if _, err := modeByName(o.profileMode); err != nil {
		return fmt.Errorf("invalid -profile-mode: %w", err)
	}
	if err := checkPeerList(o.peers); err != nil {
		return fmt.Errorf("invalid -peers: %w", err)
	}
	if o.profileDir != "" && o.directOnly {
		return errors.New("-profile and -direct-only exclude each other: profiles are taken of iapd")
	}
	return nil
}

// hasPhase reports whether the run includes the named measure.
func (o *options) hasPhase(name string) bool { return slices.Contains(o.phases, name) }

// runBenchmark runs every chosen measure, prints the table and writes the
// results into opts.outDir.
func runBenchmark(ctx context.Context, opts *options, stdout, stderr io.Writer) error {
	started := time.Now()
	progress := func(format string, args ...any) {
		fmt.Fprintf(stderr, "[%5.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
	}

	if err := os.MkdirAll(opts.outDir, 0o755); err != nil {
		return fmt.Errorf("creating output directory: %w", err)
	}
	limitNote, err := raiseFileLimit(opts.tunnels)
	if err != nil {
		return err
	}
	needsTunnels := (opts.hasPhase("memory") || opts.hasPhase("scale")) && !opts.directOnly
	if limitNote != "" && needsTunnels {
		progress("%s", limitNote)
	}

	env, err := newEnvironment(opts.ends)
	if err != nil {
		return err
	}
	defer env.close()

	res := newResults(opts)
	if limitNote != "" && needsTunnels {
		res.note("%s", limitNote)
	}
	modes := []mode{directMode()}
	if !opts.directOnly {
		modes = append(modes, proxyModes()...)
	}
	if !opts.directOnly && (opts.hasPhase("bulk") || opts.hasPhase("setup")) {
		peers, err := startPeers(ctx, opts.peers, env.dir, res, progress)
		if err != nil {
			return err
		}
		defer func() {
			for _, p := range peers {
				p.stop()
			}
		}()
		for _, p := range peers {
			modes = append(modes, p.mode())
		}
	}

	if opts.hasPhase("dns") {
		progress("resolver: %d workers, %s per run", opts.dnsWorkers, opts.dnsDuration)
		if err := measureDNS(ctx, opts, env, res); err != nil {
			return err
		}
	}

	var daemon *iapd
	if !opts.directOnly && (opts.hasPhase("bulk") || opts.hasPhase("setup")) {
		progress("starting %s", opts.iapdPath)
		daemon, err = startIapd(ctx, opts.iapdPath, env, false)
		if err != nil {
			return err
		}
		defer daemon.stop()
		res.Meta.IapdVersion = iapdVersion(opts.iapdPath)
	}

	if opts.hasPhase("bulk") {
		progress("bulk: %d MiB per transfer, %d parallel streams", opts.bulkMiB, opts.streams)
		if err := measureBulk(ctx, opts, env, daemon, modes, res, progress); err != nil {
			return err
		}
	}
	if opts.hasPhase("setup") {
		progress("connection setup: %d workers, %s per run", opts.setupWorkers, opts.setupDuration)
		if err := measureSetup(ctx, opts, env, daemon, modes, res, progress); err != nil {
			return err
		}
	}
	if daemon != nil {
		if err := daemon.stop(); err != nil {
			return err
		}
	}

	if opts.hasPhase("memory") && !opts.directOnly {
		progress("memory: %d idle tunnels, a fresh iapd per run", opts.tunnels)
		if err := measureMemory(ctx, opts, env, res, progress); err != nil {
			return err
		}
	}
	if opts.hasPhase("scale") && !opts.directOnly {
		progress("scale: up to %d idle tunnels, then 1 to %d streams, a fresh iapd per run", opts.tunnels, scaleStreams[len(scaleStreams)-1])
		if err := measureScale(ctx, opts, env, res, progress); err != nil {
			return err
		}
	}

	res.Meta.Seconds = time.Since(started).Seconds()
	table := res.table()
	fmt.Fprint(stdout, table)
	if err := res.write(opts.outDir, table); err != nil {
		return err
	}
	progress("wrote %s", filepath.Join(opts.outDir, "results.json"))
	return nil
}

// fileMargin is the number of descriptors asked for beside the tunnels:
// listeners, pipes for splice and each process's own files.
const fileMargin = 1024

// raiseFileLimit lets this process, and the sink process and iapd that
// inherit its limit, hold every tunnel of the memory and scale measures:
// each tunnel takes a client descriptor here, a sink descriptor in the
// sink process and at least two in iapd. When the hard limit cannot be
// raised (no CAP_SYS_RESOURCE), it raises the soft limit to the hard one
// and returns a note; the measures then open as many tunnels as fit (see
// fitTunnels).
func raiseFileLimit(tunnels int) (string, error) {
	need := uint64(2*tunnels + fileMargin)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return "", fmt.Errorf("reading RLIMIT_NOFILE: %w", os.NewSyscallError("getrlimit", err))
	}

	// Setrlimit is called even when the limit suffices, so that children
	// inherit this soft limit instead of the one Go restores for them.
	want := syscall.Rlimit{Cur: max(need, lim.Cur), Max: max(need, lim.Max)}
	err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want)
	if err == nil {
		return "", nil
	}

	want = syscall.Rlimit{Cur: lim.Max, Max: lim.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
		return "", fmt.Errorf("raising RLIMIT_NOFILE to its hard limit %d: %w", lim.Max, os.NewSyscallError("setrlimit", err))
	}
	return fmt.Sprintf("RLIMIT_NOFILE hard limit is %d and raising it to %d for %d tunnels failed (%v; it needs CAP_SYS_RESOURCE)",
		lim.Max, need, tunnels, os.NewSyscallError("setrlimit", err)), nil
}
