package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// transferTimeout bounds one bulk transfer, so that a proxy that stops
// relaying ends the run with an error instead of hanging it.
const transferTimeout = 5 * time.Minute

// direction is which way the bytes of a bulk transfer flow.
type direction int

const (
	upload   direction = iota // client to sink
	download                  // sink to client
)

func (d direction) String() string {
	if d == upload {
		return "upload"
	}
	return "download"
}

// measureBulk runs, for every repeat and mode, the four bulk transfers
// (each direction with one stream and with opts.streams streams) and the
// CPU time that iapd, the clients and the sinks spent on them. Modes take
// turns within a repeat, so that a slow drift of the machine spreads over
// all.
func measureBulk(ctx context.Context, opts *options, env *environment, d *iapd, modes []mode, res *results, progress func(string, ...any)) error {
	total := int64(opts.bulkMiB) << 20
	for r := range opts.repeat {
	modes:
		for _, m := range modes {
			if m.peer != nil && m.peer.failed {
				continue
			}
			c := clientFor(m, d)
			cpu, err := startCPUMeter(d, m, env.sinkPID)
			if err != nil {
				return err
			}

			var moved int64
			for _, dir := range []direction{upload, download} {
				for _, streams := range []int{1, opts.streams} {
					rate, err := runBulk(ctx, c, env, dir, streams, total)
					if err != nil {
						err = fmt.Errorf("bulk %s, %s with %d streams: %w", m.Name, dir, streams, err)
						if m.peer != nil && ctx.Err() == nil {
							m.peer.fail(res, progress, err)
							continue modes
						}
						return withIapdState(err, d)
					}
					res.add(sectionRelay, bulkLabel(dir, streams), m.Name, "MB/s", rate)
					moved += total
				}
			}

			used, err := cpu.stop()
			if err != nil {
				return err
			}
			addCPUFigures(res, m, "", "s/GB", used, func(t time.Duration) float64 {
				return t.Seconds() / (float64(moved) / 1e9)
			})
			progress("bulk run %d/%d %s done", r+1, opts.repeat, m.Name)
		}
	}
	return nil
}

func bulkLabel(dir direction, streams int) string {
	if streams == 1 {
		return fmt.Sprintf("%s, 1 stream", dir)
	}
	return fmt.Sprintf("%s, %d streams", dir, streams)
}

// addCPUFigures records the CPU time of each party and of all three,
// scaled by per to the unit of work, as the rows "proxy CPU"+suffix,
// "client CPU"+suffix, "sink CPU"+suffix and "total CPU"+suffix. The
// proxy is iapd, or the peer in a peer's column.
func addCPUFigures(res *results, m mode, suffix, unit string, used cpuUse, per func(time.Duration) float64) {
	if m.kind == kindDirect {
		// No proxy works for direct; the empty figure keeps the row order
		// of the table and prints as n/a.
		res.figure(sectionRelay, "proxy CPU"+suffix, m.Name, unit)
	} else {
		res.add(sectionRelay, "proxy CPU"+suffix, m.Name, unit, per(used.proxy))
	}
	res.add(sectionRelay, "client CPU"+suffix, m.Name, unit, per(used.client))
	res.add(sectionRelay, "sink CPU"+suffix, m.Name, unit, per(used.sink))
	res.add(sectionRelay, "total CPU"+suffix, m.Name, unit, per(used.proxy+used.client+used.sink))
}

// cpuMeter measures the CPU time of the proxy, of this process (the
// clients) and of the sink process over a span.
type cpuMeter struct {
	proxyCPU func() (time.Duration, error) // nil for direct: no proxy works then
	sinkPID  int
	start    cpuUse
}

// cpuUse is CPU time, user plus system, of each party.
type cpuUse struct {
	proxy, client, sink time.Duration
}

func startCPUMeter(d *iapd, m mode, sinkPID int) (*cpuMeter, error) {
	cm := &cpuMeter{sinkPID: sinkPID}
	switch {
	case m.kind == kindDirect:
	case m.peer != nil:
		cm.proxyCPU = m.peer.cpu
	case d != nil:
		cm.proxyCPU = func() (time.Duration, error) { return processCPU(d.pid) }
	}
	var err error
	cm.start, err = cm.read()
	return cm, err
}

func (cm *cpuMeter) read() (cpuUse, error) {
	var u cpuUse
	var err error
	if u.client, err = selfCPU(); err != nil {
		return u, err
	}
	if u.sink, err = processCPU(cm.sinkPID); err != nil {
		return u, err
	}
	if cm.proxyCPU != nil {
		if u.proxy, err = cm.proxyCPU(); err != nil {
			return u, err
		}
	}
	return u, nil
}

// stop returns the CPU time each party used since the meter started.
func (cm *cpuMeter) stop() (cpuUse, error) {
	now, err := cm.read()
	if err != nil {
		return cpuUse{}, err
	}
	return cpuUse{
		proxy:  now.proxy - cm.start.proxy,
		client: now.client - cm.start.client,
		sink:   now.sink - cm.start.sink,
	}, nil
}

// runBulk moves total bytes in one direction over the given number of
// streams, split evenly, and returns the rate in MB/s (10^6 bytes per
// second). The clock runs from the first length header to the last byte
// arriving; connecting and the proxy handshakes are not timed.
func runBulk(ctx context.Context, c client, env *environment, dir direction, streams int, total int64) (float64, error) {
	target := env.sinks.Upload
	if dir == download {
		target = env.sinks.Download
	}

	conns := make([]*net.TCPConn, 0, streams)
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	for range streams {
		conn, err := c.dial(ctx, target)
		if err != nil {
			return 0, fmt.Errorf("connecting: %w", err)
		}
		conns = append(conns, conn)
	}
	stopOnCancel := context.AfterFunc(ctx, func() {
		for _, conn := range conns {
			conn.Close()
		}
	})
	defer stopOnCancel()

	deadline := time.Now().Add(transferTimeout)
	errs := make([]error, streams)
	var wg sync.WaitGroup
	start := time.Now()
	for i, conn := range conns {
		n := total / int64(streams)
		if i == 0 {
			n += total % int64(streams)
		}
		conn.SetDeadline(deadline)
		wg.Go(func() {
			if dir == upload {
				errs[i] = uploadStream(conn, env.ends, n)
			} else {
				errs[i] = downloadStream(conn, env.ends, n)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return float64(total) / elapsed.Seconds() / 1e6, nil
}

func uploadStream(conn *net.TCPConn, ends *dataEnds, n int64) error {
	if err := writeLength(conn, n); err != nil {
		return fmt.Errorf("sending length: %w", err)
	}
	if sent, err := ends.send(conn, n); err != nil {
		return fmt.Errorf("sending after %d of %d bytes: %w", sent, n, err)
	}
	var ack [1]byte
	if _, err := io.ReadFull(conn, ack[:]); err != nil {
		return fmt.Errorf("waiting for the sink to confirm %d bytes: %w", n, err)
	}
	return nil
}

func downloadStream(conn *net.TCPConn, ends *dataEnds, n int64) error {
	if err := writeLength(conn, n); err != nil {
		return fmt.Errorf("sending length: %w", err)
	}
	got, err := ends.receive(conn, n)
	if err != nil {
		return fmt.Errorf("receiving after %d of %d bytes: %w", got, n, err)
	}
	if got != n {
		return fmt.Errorf("connection closed after %d of %d bytes", got, n)
	}
	return nil
}

// setupResult is one run of the connection setup measure.
type setupResult struct {
	conns     int
	elapsed   time.Duration
	latencies []time.Duration // sorted
	errors    int
	firstErr  error
}

func (r setupResult) rate() float64 { return float64(r.conns) / r.elapsed.Seconds() }

// percentile returns the nearest-rank percentile p (0 to 100) of the
// latencies.
func (r setupResult) percentile(p float64) time.Duration {
	if len(r.latencies) == 0 {
		return 0
	}
	rank := int(p/100*float64(len(r.latencies))+0.5) - 1
	return r.latencies[min(max(rank, 0), len(r.latencies)-1)]
}

// measureSetup runs the connection setup measure for every repeat and mode.
func measureSetup(ctx context.Context, opts *options, env *environment, d *iapd, modes []mode, res *results, progress func(string, ...any)) error {
	for r := range opts.repeat {
		for _, m := range modes {
			if m.peer != nil && m.peer.failed {
				continue
			}
			cpu, err := startCPUMeter(d, m, env.sinkPID)
			if err != nil {
				return err
			}
			sr := runSetup(ctx, clientFor(m, d), env.sinks, opts.setupWorkers, opts.setupDuration)
			if err := ctx.Err(); err != nil {
				return err
			}
			used, err := cpu.stop()
			if err != nil {
				return err
			}
			if sr.errors > 0 {
				res.addError(sectionRelay, "setup rate", m.Name, "conn/s", sr.errors, sr.firstErr)
			}
			if sr.conns == 0 {
				err := fmt.Errorf("connection setup %s: no connection completed: %w", m.Name, sr.firstErr)
				if m.peer != nil {
					m.peer.fail(res, progress, err)
					continue
				}
				return withIapdState(err, d)
			}
			res.add(sectionRelay, "setup rate", m.Name, "conn/s", sr.rate())
			res.add(sectionRelay, "setup latency p50", m.Name, "ms", ms(sr.percentile(50)))
			res.add(sectionRelay, "setup latency p99", m.Name, "ms", ms(sr.percentile(99)))
			addCPUFigures(res, m, " per connection", "µs", used, func(t time.Duration) float64 {
				return float64(t.Microseconds()) / float64(sr.conns)
			})
			progress("setup run %d/%d %s: %.0f conn/s, %d errors", r+1, opts.repeat, m.Name, sr.rate(), sr.errors)
		}
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// runSetup has workers open connections for the given duration, each one
// doing connect, proxy handshake, a 1-byte echo and close. The sink closes
// first and the client closes once it has read the end of the stream (see
// serveEchoOnce). A cycle that is under way when the duration ends is
// finished and counted, and the rate divides by the time until the last
// cycle ended.
func runSetup(ctx context.Context, c client, s *sinkAddrs, workers int, duration time.Duration) setupResult {
	type workerResult struct {
		latencies []time.Duration
		errors    int
		firstErr  error
	}
	results := make([]workerResult, workers)

	var wg sync.WaitGroup
	start := time.Now()
	end := start.Add(duration)
	for w := range workers {
		target := s.echoOnceAddr(w)
		wg.Go(func() {
			wr := &results[w]
			for time.Now().Before(end) && ctx.Err() == nil {
				latency, err := echoOnce(ctx, c, target)
				if err != nil {
					wr.errors++
					if wr.firstErr == nil {
						wr.firstErr = err
					}
					// Errors such as EADDRNOTAVAIL persist for a while;
					// pausing keeps the loop from spinning on them.
					time.Sleep(time.Millisecond)
					continue
				}
				wr.latencies = append(wr.latencies, latency)
			}
		})
	}
	wg.Wait()

	sr := setupResult{elapsed: time.Since(start)}
	for _, wr := range results {
		sr.latencies = append(sr.latencies, wr.latencies...)
		sr.errors += wr.errors
		if sr.firstErr == nil {
			sr.firstErr = wr.firstErr
		}
	}
	sr.conns = len(sr.latencies)
	slices.Sort(sr.latencies)
	return sr
}

// echoOnce is one cycle of the setup measure against an echo-once sink.
// The latency it returns runs from connect to the echo; waiting for the
// end of the stream and closing are not timed.
func echoOnce(ctx context.Context, c client, target netip.AddrPort) (time.Duration, error) {
	start := time.Now()
	conn, err := c.dial(ctx, target)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	if err := echoByte(conn); err != nil {
		return 0, err
	}
	latency := time.Since(start)

	conn.SetReadDeadline(time.Now().Add(handshakeTimeout))
	var buf [1]byte
	if n, err := conn.Read(buf[:]); err != io.EOF {
		return 0, fmt.Errorf("waiting for the end of the stream: read %d bytes, %v", n, err)
	}
	return latency, nil
}

// echoByte writes one byte and reads it back.
func echoByte(conn *net.TCPConn) error {
	conn.SetDeadline(time.Now().Add(handshakeTimeout))
	defer conn.SetDeadline(time.Time{})
	buf := [1]byte{'x'}
	if _, err := conn.Write(buf[:]); err != nil {
		return fmt.Errorf("writing echo byte: %w", err)
	}
	if _, err := io.ReadFull(conn, buf[:]); err != nil {
		return fmt.Errorf("reading echo byte: %w", err)
	}
	return nil
}

// withIapdState adds iapd's output to err when iapd has died, which is
// the likely cause of a failed transfer.
func withIapdState(err error, d *iapd) error {
	if d == nil {
		return err
	}
	if dead := d.alive(); dead != nil {
		return fmt.Errorf("%w\n%w", err, dead)
	}
	return err
}
