package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// settleTime is how long iapd is left alone before its memory is read, so
// that goroutines started for the last tunnels have run.
const settleTime = time.Second

// memorySample is one run of the memory measure.
type memorySample struct {
	tunnels                          int // tunnels open when "with" was read
	before, with                     memoryUsage
	filesBefore, filesWith           int
	threads                          int
	goroutinesBefore, goroutinesWith int // -1 when iapd does not serve pprof
	note                             string
}

// iapdFileMargin is the number of descriptors left free in iapd beside
// the tunnels, for its own files and a pprof request.
const iapdFileMargin = 256

// probeTunnels is the size of the first batch of tunnels, from which the
// memory measure learns how many file descriptors iapd spends on one.
const probeTunnels = 100

// memoryModes are the proxy modes whose idle tunnels the memory measure
// counts: one per front end.
var memoryModes = []string{"socks5", "http"}

// memoryColumns are the columns of the memory table: iapd's modes, then
// the peers.
func memoryColumns() []string { return append(slices.Clone(memoryModes), peerNames()...) }

// measureMemory starts a fresh iapd for each repeat and mode, so that no
// run measures heap left over from an earlier one, and reads its memory
// before and with opts.tunnels idle tunnels open.
func measureMemory(ctx context.Context, opts *options, env *environment, res *results, progress func(string, ...any)) error {
	noGoroutines := false
	notes := map[string]bool{}
	peerTunnels := opts.tunnels
	for r := range opts.repeat {
		for _, col := range memoryModes {
			m, err := modeByName(col)
			if err != nil {
				return err
			}
			d, err := startIapd(ctx, opts.iapdPath, env, true)
			if err != nil {
				return err
			}
			s, err := runMemory(ctx, d, env, m, opts.tunnels, opts.setupWorkers)
			if err != nil {
				err = withIapdState(fmt.Errorf("memory run %d, %s: %w", r+1, col, err), d)
			}
			if stopErr := d.stop(); err == nil {
				err = stopErr
			}
			if err != nil {
				return err
			}
			if s.note != "" && !notes[s.note] {
				notes[s.note] = true
				progress("%s", s.note)
			}
			if s.note != "" {
				res.note("%s", s.note)
			}

			if col == "socks5" {
				peerTunnels = s.tunnels
			}
			n := float64(s.tunnels)
			addMemoryFigures(res, col, s.tunnels, s.before, s.with, s.filesWith-s.filesBefore, s.threads)
			if s.goroutinesWith >= 0 {
				res.add(sectionMemory, "goroutines idle", col, "", float64(s.goroutinesBefore))
				res.add(sectionMemory, "goroutines with tunnels", col, "", float64(s.goroutinesWith))
				res.add(sectionMemory, "goroutines per tunnel", col, "", float64(s.goroutinesWith-s.goroutinesBefore)/n)
			} else {
				res.figure(sectionMemory, "goroutines per tunnel", col, "")
				noGoroutines = true
			}
			progress("memory run %d/%d %s: %d tunnels, RSS %d -> %d KiB, %.1f KiB per tunnel",
				r+1, opts.repeat, col, s.tunnels, s.before.RSS, s.with.RSS, float64(s.with.RSS-s.before.RSS)/n)
		}
	}
	if noGoroutines {
		res.note("goroutines: n/a, because iapd did not serve net/http/pprof at %s (a thread count is not a goroutine count)", pprofEnv)
	}
	return measurePeerMemory(ctx, opts, env, res, peerTunnels, progress)
}

// addMemoryFigures records the memory rows of one run in column col.
func addMemoryFigures(res *results, col string, tunnels int, before, with memoryUsage, addedFiles, threads int) {
	n := float64(tunnels)
	res.add(sectionMemory, "tunnels open", col, "", n)
	res.add(sectionMemory, "RSS idle", col, "KiB", float64(before.RSS))
	res.add(sectionMemory, "RSS with tunnels", col, "KiB", float64(with.RSS))
	res.add(sectionMemory, "RSS per tunnel", col, "KiB", float64(with.RSS-before.RSS)/n)
	res.add(sectionMemory, "PSS idle", col, "KiB", float64(before.PSS))
	res.add(sectionMemory, "PSS with tunnels", col, "KiB", float64(with.PSS))
	res.add(sectionMemory, "PSS per tunnel", col, "KiB", float64(with.PSS-before.PSS)/n)
	res.add(sectionMemory, "file descriptors per tunnel", col, "", float64(addedFiles)/n)
	res.add(sectionMemory, "threads with tunnels", col, "", float64(threads))
}

// measurePeerMemory measures the peers' memory like iapd's, with as many
// tunnels as iapd's SOCKS5 runs held, a fresh peer for each repeat. A
// peer that runs several processes (Dante) is counted as their sum, PSS
// being the figure that counts their shared pages once.
func measurePeerMemory(ctx context.Context, opts *options, env *environment, res *results, tunnels int, progress func(string, ...any)) error {
	kinds, notes, err := findPeers(opts.peers)
	if err != nil {
		return err
	}
	for _, n := range notes {
		res.note("%s", n)
	}
	failed := map[string]bool{}
	for r := range opts.repeat {
		for _, k := range kinds {
			if failed[k.name] {
				continue
			}
			p, err := startPeer(ctx, k, env.dir)
			if err != nil {
				return err
			}
			before, with, open, note, err := runPeerMemory(ctx, p, env, tunnels, opts.setupWorkers)
			p.stop()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil {
				// A peer that fails costs its own figures, not iapd's.
				progress("memory run %d/%d peer %s failed: %v; its output:\n%s", r+1, opts.repeat, k.name, err, p.stderr.String())
				res.note("peer %s: memory run %d failed, so its memory figures are from the runs before: %v", k.name, r+1, err)
				failed[k.name] = true
				continue
			}
			if note != "" {
				res.note("%s", note)
			}

			col, n := k.name, float64(open)
			addMemoryFigures(res, col, open, before.mem, with.mem, with.files-before.files, with.threads)
			res.add(sectionMemory, "processes with tunnels", col, "", float64(with.processes))
			progress("memory run %d/%d peer %s: %d tunnels, PSS %d -> %d KiB, %.1f KiB per tunnel",
				r+1, opts.repeat, col, open, before.mem.PSS, with.mem.PSS, float64(with.mem.PSS-before.mem.PSS)/n)
		}
	}
	return nil
}

// runPeerMemory reads the peer's usage before and with up to want idle
// tunnels open. A peer of one process gets as many as fit under its file
// limit, as iapd does, and the returned note explains when that is fewer.
func runPeerMemory(ctx context.Context, p *peer, env *environment, want, workers int) (before, with treeUsage, tunnels int, note string, err error) {
	time.Sleep(settleTime)
	pid := p.cmd.Process.Pid
	if before, err = readTreeUsage(pid); err != nil {
		return before, with, 0, "", err
	}

	c := clientFor(p.mode(), nil)
	probe := min(probeTunnels, want)
	conns, err := openTunnels(ctx, c, env.sinks, probe, workers, nil)
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	if err != nil {
		return before, with, 0, "", err
	}
	tunnels = want
	if before.processes == 1 {
		if tunnels, note, err = fitTunnels(p.kind.name, pid, want, probe, before.files); err != nil {
			return before, with, 0, "", err
		}
	}
	if conns, err = openTunnels(ctx, c, env.sinks, tunnels-probe, workers, conns); err != nil {
		return before, with, 0, "", err
	}

	time.Sleep(settleTime)
	with, err = readTreeUsage(pid)
	return before, with, tunnels, note, err
}

func runMemory(ctx context.Context, d *iapd, env *environment, m mode, tunnels, workers int) (memorySample, error) {
	s := memorySample{tunnels: tunnels}
	time.Sleep(settleTime)
	var err error
	if s.before, err = processMemory(d.pid); err != nil {
		return s, err
	}
	if s.filesBefore, err = processFiles(d.pid); err != nil {
		return s, err
	}
	s.goroutinesBefore = goroutineCount(d)

	c := clientFor(m, d)
	var conns []*net.TCPConn
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()

	// A first batch shows how many descriptors iapd spends per tunnel,
	// which decides how many tunnels fit under its RLIMIT_NOFILE.
	probe := min(probeTunnels, tunnels)
	conns, err = openTunnels(ctx, c, env.sinks, probe, workers, conns)
	if err != nil {
		return s, err
	}
	if s.tunnels, s.note, err = fitTunnels("iapd", d.pid, tunnels, probe, s.filesBefore); err != nil {
		return s, err
	}
	if conns, err = openTunnels(ctx, c, env.sinks, s.tunnels-probe, workers, conns); err != nil {
		return s, err
	}

	time.Sleep(settleTime)
	if s.with, err = processMemory(d.pid); err != nil {
		return s, err
	}
	if s.filesWith, err = processFiles(d.pid); err != nil {
		return s, err
	}
	if s.threads, err = processThreads(d.pid); err != nil {
		return s, err
	}
	s.goroutinesWith = goroutineCount(d)
	if s.goroutinesBefore < 0 {
		s.goroutinesWith = -1
	}
	return s, nil
}

// fitTunnels returns how many tunnels the proxy called name, process pid,
// can hold under its file limit, at most want, given that probe tunnels
// are open and it had filesBefore descriptors without them. When that is
// fewer than want, the note gives the reason.
func fitTunnels(name string, pid, want, probe, filesBefore int) (int, string, error) {
	files, err := processFiles(pid)
	if err != nil {
		return 0, "", err
	}
	limit, err := processFileLimit(pid)
	if err != nil {
		return 0, "", err
	}
	perTunnel := float64(files-filesBefore) / float64(probe)
	if perTunnel <= 0 {
		return want, "", nil
	}
	fit := int(float64(limit-filesBefore-iapdFileMargin) / perTunnel)
	if fit >= want {
		return want, "", nil
	}
	fit = max(fit, probe)
	// The note leaves out the count, which varies between repeats with
	// the descriptors that iapd keeps beside the tunnels; the table's
	// "tunnels open" rows give it.
	return fit, fmt.Sprintf("tunnels lowered from %d to what fits: %s uses about %.0f file descriptors per tunnel and its RLIMIT_NOFILE is %d",
		want, name, perTunnel, limit), nil
}

// openTunnels opens n more tunnels to the echo sinks and checks each with
// one echoed byte, so that every tunnel is relaying end to end when it is
// counted. It returns conns with the new tunnels appended, also on error.
func openTunnels(ctx context.Context, c client, s *sinkAddrs, n, workers int, conns []*net.TCPConn) ([]*net.TCPConn, error) {
	var (
		mu       sync.Mutex // protects conns and firstErr
		firstErr error
		next     atomic.Int64
		wg       sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			for next.Add(1) <= int64(n) && ctx.Err() == nil {
				conn, err := c.dial(ctx, s.echoAddr(w))
				if err == nil {
					if err = echoByte(conn); err != nil {
						conn.Close()
					}
				}
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = err
				}
				if err == nil {
					conns = append(conns, conn)
				}
				stop := firstErr != nil
				mu.Unlock()
				if stop {
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return conns, fmt.Errorf("opening tunnel %d (%d open): %w", len(conns)+1, len(conns), firstErr)
	}
	return conns, ctx.Err()
}

// goroutineCount returns iapd's goroutine count from its net/http/pprof
// endpoint, or -1 when iapd does not serve one.
func goroutineCount(d *iapd) int {
	if d.pprof == "" {
		return -1
	}
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + d.pprof + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return -1
	}

	// The first line of the debug=1 text format reads
	// "goroutine profile: total N".
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil {
		return -1
	}
	total, ok := strings.CutPrefix(strings.TrimSpace(line), "goroutine profile: total ")
	if !ok {
		return -1
	}
	n, err := strconv.Atoi(total)
	if err != nil {
		return -1
	}
	return n
}
