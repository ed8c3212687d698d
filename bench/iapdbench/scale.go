package main

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"
)

// scaleSteps are the numbers of idle tunnels at which the scale measure
// takes its figures; "max" is as many as opts.tunnels and the file limits
// allow.
var scaleSteps = []string{"1", "10", "100", "1000", "max"}

// minTunnelsPerTunnelRSS is the fewest tunnels over which the scale
// measure divides RSS growth: below it, the growth is the runtime's
// allocation granularity, not the tunnels' cost.
const minTunnelsPerTunnelRSS = 100

// scaleStreams are the numbers of parallel streams of the scale measure's
// bulk transfers.
var scaleStreams = []int{1, 2, 4, 8}

// measureScale shows how iapd's figures change with the work it holds. It
// starts a fresh iapd for each repeat, opens idle SOCKS5 tunnels step by
// step up to the maximum, and at each step reads the memory per idle
// tunnel and measures single-stream throughput in both directions and the
// connection setup rate. It then measures bulk throughput with 1 to 8 parallel
// streams, directly and through SOCKS5.
func measureScale(ctx context.Context, opts *options, env *environment, res *results, progress func(string, ...any)) error {
	for r := range opts.repeat {
		d, err := startIapd(ctx, opts.iapdPath, env, false)
		if err != nil {
			return err
		}
		err = runScaleTunnels(ctx, opts, env, d, res, func(format string, args ...any) {
			progress("scale run %d/%d: %s", r+1, opts.repeat, fmt.Sprintf(format, args...))
		})
		if err == nil {
			err = runScaleStreams(ctx, opts, env, d, res)
		}
		if err != nil {
			err = withIapdState(fmt.Errorf("scale run %d: %w", r+1, err), d)
		}
		if stopErr := d.stop(); err == nil {
			err = stopErr
		}
		if err != nil {
			return err
		}
		progress("scale run %d/%d done", r+1, opts.repeat)
	}
	return nil
}

// runScaleTunnels is one repeat of the idle tunnel steps.
func runScaleTunnels(ctx context.Context, opts *options, env *environment, d *iapd, res *results, progress func(string, ...any)) error {
	socks, err := modeByName("socks5")
	if err != nil {
		return err
	}
	c := clientFor(socks, d)

	// The steps' own transfers and setup runs grow iapd's heap once; a
	// first round of them before the base reading keeps that growth out
	// of the tunnels' share.
	total := int64(opts.bulkMiB) << 20
	if err := runScaleWork(ctx, opts, env, c, total, nil, ""); err != nil {
		return fmt.Errorf("warming up: %w", err)
	}
	time.Sleep(settleTime)
	base, err := processMemory(d.pid)
	if err != nil {
		return err
	}
	filesBefore, err := processFiles(d.pid)
	if err != nil {
		return err
	}

	var conns []*net.TCPConn
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	want := opts.tunnels
	for _, step := range scaleSteps {
		n := want
		if step != "max" {
			n, _ = strconv.Atoi(step)
			if n > want {
				continue
			}
		} else if want <= 1000 {
			continue
		}
		if conns, err = openTunnels(ctx, c, env.sinks, n-len(conns), opts.setupWorkers, conns); err != nil {
			return err
		}
		if n == probeTunnels {
			// As in the memory measure, learn how many tunnels fit.
			fit, note, err := fitTunnels("iapd", d.pid, opts.tunnels, probeTunnels, filesBefore)
			if err != nil {
				return err
			}
			want = fit
			if note != "" {
				res.note("scale: %s", note)
			}
		}

		time.Sleep(settleTime)
		mem, err := processMemory(d.pid)
		if err != nil {
			return err
		}
		res.add(sectionScaleTunnels, "tunnels open", step, "", float64(len(conns)))
		res.add(sectionScaleTunnels, "RSS", step, "KiB", float64(mem.RSS))
		if len(conns) >= minTunnelsPerTunnelRSS {
			res.add(sectionScaleTunnels, "RSS per tunnel", step, "KiB", float64(mem.RSS-base.RSS)/float64(len(conns)))
		} else {
			res.figure(sectionScaleTunnels, "RSS per tunnel", step, "KiB")
		}

		if err := runScaleWork(ctx, opts, env, c, total, res, step); err != nil {
			return fmt.Errorf("with %d tunnels open: %w", len(conns), err)
		}
		progress("%d tunnels open: RSS %d KiB", len(conns), mem.RSS)
	}
	return nil
}

// runScaleWork runs a single-stream download and upload of total bytes
// and a setup run through c, and records them in the column step of res
// unless res is nil.
func runScaleWork(ctx context.Context, opts *options, env *environment, c client, total int64, res *results, step string) error {
	for _, dir := range []direction{download, upload} {
		rate, err := runBulk(ctx, c, env, dir, 1, total)
		if err != nil {
			return fmt.Errorf("bulk %s: %w", dir, err)
		}
		if res != nil {
			res.add(sectionScaleTunnels, bulkLabel(dir, 1), step, "MB/s", rate)
		}
	}
	sr := runSetup(ctx, c, env.sinks, opts.setupWorkers, opts.setupDuration)
	if sr.conns == 0 {
		return fmt.Errorf("connection setup: no connection completed: %w", sr.firstErr)
	}
	if res == nil {
		return nil
	}
	if sr.errors > 0 {
		res.addError(sectionScaleTunnels, "setup rate", step, "conn/s", sr.errors, sr.firstErr)
	}
	res.add(sectionScaleTunnels, "setup rate", step, "conn/s", sr.rate())
	res.add(sectionScaleTunnels, "setup latency p99", step, "ms", ms(sr.percentile(99)))
	return nil
}

// runScaleStreams is one repeat of the bulk transfers with 1 to 8
// parallel streams.
func runScaleStreams(ctx context.Context, opts *options, env *environment, d *iapd, res *results) error {
	total := int64(opts.bulkMiB) << 20
	for _, name := range scaleStreamModes {
		m := directMode()
		if name != m.Name {
			var err error
			if m, err = modeByName(name); err != nil {
				return err
			}
		}
		c := clientFor(m, d)
		for _, streams := range scaleStreams {
			for _, dir := range []direction{download, upload} {
				rate, err := runBulk(ctx, c, env, dir, streams, total)
				if err != nil {
					return fmt.Errorf("bulk %s, %s with %d streams: %w", m.Name, dir, streams, err)
				}
				res.add(sectionScaleStreams, bulkLabel(dir, streams), m.Name, "MB/s", rate)
			}
		}
	}
	return nil
}

// scaleStreamModes are the columns of the streams table. HTTP CONNECT is
// left out: after the handshake its tunnels take the same relay as SOCKS5.
var scaleStreamModes = []string{"direct", "socks5"}
