package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"iapd/internal/netnstest"
	"iapd/internal/testbed"
)

// The soak test runs iapd in a test bed under many concurrent clients
// that move checksummed data through every front end. Meanwhile some of
// them abort, half-close, read slowly or send garbage, links flap, and an
// access point's cap displaces low priority connections. At the end the
// daemon's goroutines, file descriptors and heap must be back within
// stated bounds of where they started, and every transfer that completed
// must have arrived byte for byte.
//
// The short form runs with the other tests. IAPD_SOAK=long runs the long
// form (make soak), and IAPD_SOAK_REPORT=FILE writes its figures to FILE.

// soakSettings sizes one soak run.
type soakSettings struct {
	name        string
	clients     int           // client workers, each with at most one connection at a time
	duration    time.Duration // of the load
	maxPayload  int           // bytes per transfer, at most
	flapEvery   time.Duration // a link goes down this often
	flapFor     time.Duration // and stays down this long
	idleTimeout time.Duration // iapd's limits.idle_timeout
}

var (
	shortSoak = soakSettings{name: "short", clients: 300, duration: 15 * time.Second, maxPayload: 128 << 10,
		flapEvery: 3 * time.Second, flapFor: 500 * time.Millisecond, idleTimeout: 3 * time.Second}
	longSoak = soakSettings{name: "long", clients: 3000, duration: 3 * time.Minute, maxPayload: 1 << 20,
		flapEvery: 10 * time.Second, flapFor: 2 * time.Second, idleTimeout: 5 * time.Second}
)

// Bounds on what the daemon may keep after the load, over its state before
// any client came. The goroutine allowance covers a few HTTP transports
// whose last idle connection is still closing, and the heap one the
// transports, DNS cache entries and the runtime's own growth.
const (
	maxGoroutineGrowth = 25
	maxFDGrowth        = 10
	maxHeapGrowth      = 16 << 20
)

// soakPolicy serves apps bulk (wifi, then cell), interactive (cell, then
// wifi; priority 10) and background (cell only; priority -10). cell takes
// CELL_CAP connections, so interactive and bulk displace background there,
// and background's listener takes LISTENER_CAP clients. The upper-case
// words are filled in by soakRun.policy, which varies some of them from
// one reload to the next.
const soakPolicy = `
listeners:
  - {listen: "127.0.0.1:1080", protocol: socks5, app: bulk, max_connections: 10000}
  - {listen: "127.0.0.1:1081", protocol: mixed, app: interactive, max_connections: 10000}
  - {listen: "127.0.0.1:1082", protocol: BG_PROTOCOL, app: background, max_connections: LISTENER_CAP}
  - listen: "127.0.0.1:3128"
    protocol: http
    max_connections: 10000
    users:
      - {name: soak, password_env: IAPD_SOAK_PASSWORD, app: bulk}
apps:
  bulk: {destination: wifi-first}
  interactive: {destination: cell-first, priority: 10}
  background: {access_point: cell, priority: -10}
access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1]
    max_connections: CELL_CAP
destinations:
  wifi-first: {access_points: [wifi, cell]}
  cell-first: {access_points: [cell, wifi]}
limits:
  handshake_timeout: 2s
  dial_timeout: 5s
  idle_timeout: IDLE
  auth_failure_delay: AUTH_DELAY
`

const (
	soakPassword = "soak-secret"
	pprofAddr    = "127.0.0.1:6061"
	echoPort     = 7
	httpEchoPort = 8080
)

func TestPrivilegedSoak(t *testing.T) {
	netnstest.Require(t)
	settings := shortSoak
	if os.Getenv("IAPD_SOAK") == "long" {
		settings = longSoak
	}

	bed := testbed.New(t, testbed.Options{})
	host := newHostDialer(bed.Host, 64)
	for _, u := range bed.Uplinks() {
		startSoakServers(t, u, settings.maxPayload)
	}
	run := &soakRun{settings: settings, host: host}
	// A later --log-level wins over the bed's debug, which would log
	// several lines per connection.
	d := bed.StartWith(t, run.policy(0), testbed.StartOptions{
		Env:  []string{"IAPD_PPROF=" + pprofAddr, "IAPD_SOAK_PASSWORD=" + soakPassword},
		Args: []string{"--log-level", "info"},
	})
	probe := &daemonProbe{pid: d.Pid(), host: host}

	before := probe.mustSample(t, true)
	t.Logf("before: %s", before)

	run.deadline = time.Now().Add(settings.duration)
	stopSampling := probe.samplePeaks(500 * time.Millisecond)
	var wg sync.WaitGroup
	for i := range settings.clients {
		wg.Go(func() { run.client(i) })
	}
	flaps, reloads := run.injectFaults(t, bed, d)
	wg.Wait()
	peak := stopSampling()

	// Every connection is gone once the idle timeout has closed the
	// pooled ones. Wait for the daemon to get back to where it started,
	// with a deadline; the bounds are checked on where it got.
	settle := time.Now().Add(2*settings.idleTimeout + 10*time.Second)
	var after daemonSample
	for {
		after = probe.mustSample(t, true)
		t.Logf("settling: %s", after)
		if after.goroutines <= before.goroutines && after.fds <= before.fds || time.Now().After(settle) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}

	logs := d.Logs()
	displaced := strings.Count(logs, `"msg":"connection displaced"`)
	if applied := strings.Count(logs, `"msg":"policy reloaded"`); applied != reloads {
		t.Errorf("iapd logged %d reloads, want %d", applied, reloads)
	}
	report := run.report(before, peak, after, flaps, reloads, displaced)
	t.Log("\n" + report)
	if path := os.Getenv("IAPD_SOAK_REPORT"); path != "" {
		if err := os.WriteFile(path, []byte(report), 0o644); err != nil {
			t.Errorf("writing the report: %v", err)
		}
	}

	for _, problem := range run.problems() {
		t.Error(problem)
	}
	if grown := after.goroutines - before.goroutines; grown > maxGoroutineGrowth {
		t.Errorf("goroutines grew by %d (%d to %d), bound %d\n%s", grown, before.goroutines, after.goroutines, maxGoroutineGrowth, probe.goroutineDump())
	}
	if grown := after.fds - before.fds; grown > maxFDGrowth {
		t.Errorf("file descriptors grew by %d (%d to %d), bound %d\n%s", grown, before.fds, after.fds, maxFDGrowth, probe.fdDump(bed))
	}
	if grown := after.heapInuse - before.heapInuse; grown > maxHeapGrowth {
		t.Errorf("heap in use grew by %d bytes (%d to %d), bound %d", grown, before.heapInuse, after.heapInuse, maxHeapGrowth)
	}
	if displaced == 0 {
		t.Errorf("no connection was displaced, so the cap on cell was never tried")
	}
}

// startSoakServers starts two servers on u's web address. A TCP echo
// server on port 7 sends back what it reads as it reads it, and closes
// after the client's half-close. An HTTP server on port 8080 responds to
// a POST with its body.
func startSoakServers(t *testing.T, u *testbed.Uplink, maxPayload int) {
	t.Helper()
	echo := u.NS.Listen(t, "tcp", net.JoinHostPort(testbed.WebIPv4.String(), strconv.Itoa(echoPort)))
	var wg sync.WaitGroup
	conns := make(map[net.Conn]struct{})
	var mu sync.Mutex
	wg.Go(func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					c.Close()
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
				}()
				// Through a buffer: the kernel's copy from a socket to
				// itself is no echo server's business.
				if _, err := io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 32<<10)); err == nil {
					c.(*net.TCPConn).CloseWrite()
					// Wait for the client to close, so that the last bytes
					// are not cut by a reset.
					c.SetReadDeadline(time.Now().Add(10 * time.Second))
					io.Copy(io.Discard, c)
				}
			})
		}
	})
	t.Cleanup(func() {
		echo.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})

	web := u.NS.Listen(t, "tcp", net.JoinHostPort(testbed.WebIPv4.String(), strconv.Itoa(httpEchoPort)))
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			body, err := io.ReadAll(io.LimitReader(r.Body, int64(maxPayload)+1))
			if err != nil {
				return
			}
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.Write(body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(web)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
}

// hostDialer opens connections from inside the bed's host namespace, a
// bounded number at a time, since each needs a thread switched into it.
type hostDialer struct {
	ns   *netnstest.NS
	sema chan struct{}
}

func newHostDialer(ns *netnstest.NS, parallel int) *hostDialer {
	return &hostDialer{ns: ns, sema: make(chan struct{}, parallel)}
}

func (h *hostDialer) dial(ctx context.Context, addr string) (*net.TCPConn, error) {
	select {
	case h.sema <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-h.sema }()
	var c net.Conn
	err := h.ns.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// daemonSample is the state of the iapd process at one moment.
type daemonSample struct {
	goroutines int
	fds        int
	rss        int64 // bytes
	heapInuse  int64 // bytes; only when sampled after a collection
}

func (s daemonSample) String() string {
	heap := ""
	if s.heapInuse > 0 {
		heap = fmt.Sprintf(", heap in use %.1f MiB", float64(s.heapInuse)/(1<<20))
	}
	return fmt.Sprintf("%d goroutines, %d file descriptors, RSS %.1f MiB%s", s.goroutines, s.fds, float64(s.rss)/(1<<20), heap)
}

// daemonProbe reads the state of iapd from /proc and from its profiling
// handlers.
type daemonProbe struct {
	pid  int
	host *hostDialer

	mu   sync.Mutex
	peak daemonSample
}

var (
	goroutineTotal = regexp.MustCompile(`goroutine profile: total (\d+)`)
	heapInuse      = regexp.MustCompile(`# HeapInuse = (\d+)`)
	vmRSS          = regexp.MustCompile(`VmRSS:\s+(\d+) kB`)
)

// get fetches a profiling page of iapd.
func (p *daemonProbe) get(path string) (string, error) {
	client := &http.Client{
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return p.host.dial(ctx, addr)
		}},
		Timeout: 20 * time.Second,
	}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + pprofAddr + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}

// sample reads iapd's state. With heap, it first makes iapd collect
// garbage twice, which makes the heap figure comparable between samples
// and the descriptor count too: Go keeps the pipes of its splice(2)
// copies in a sync.Pool, and closes them only when two collections in a
// row found them unused.
func (p *daemonProbe) sample(heap bool) (daemonSample, error) {
	var s daemonSample
	if heap {
		for range 2 {
			page, err := p.get("/debug/pprof/heap?gc=1&debug=1")
			if err != nil {
				return s, fmt.Errorf("reading iapd's heap: %w", err)
			}
			if m := heapInuse.FindStringSubmatch(page); m != nil {
				s.heapInuse, _ = strconv.ParseInt(m[1], 10, 64)
			}
		}
		// The pipes are closed by finalizers, which run on their own
		// goroutine after the collection.
		time.Sleep(50 * time.Millisecond)
	}
	page, err := p.get("/debug/pprof/goroutine?debug=1")
	if err != nil {
		return s, fmt.Errorf("reading iapd's goroutine count: %w", err)
	}
	if m := goroutineTotal.FindStringSubmatch(page); m != nil {
		s.goroutines, _ = strconv.Atoi(m[1])
	}
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.pid))
	if err != nil {
		return s, fmt.Errorf("listing iapd's file descriptors: %w", err)
	}
	s.fds = len(entries)
	if status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid)); err == nil {
		if m := vmRSS.FindSubmatch(status); m != nil {
			kb, _ := strconv.ParseInt(string(m[1]), 10, 64)
			s.rss = kb << 10
		}
	}
	return s, nil
}

// mustSample is sample for the test's goroutine, failing t on an error.
func (p *daemonProbe) mustSample(t *testing.T, heap bool) daemonSample {
	t.Helper()
	s, err := p.sample(heap)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// samplePeaks samples iapd every period until the returned function is
// called, which returns the highest figures seen.
func (p *daemonProbe) samplePeaks(period time.Duration) func() daemonSample {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		ticker := time.NewTicker(period)
		defer ticker.Stop()
		for {
			select {
			case <-stop:
				return
			case <-ticker.C:
			}
			s, err := p.sample(false)
			if err != nil {
				// Under the heaviest load a sample may time out; the
				// next one counts.
				continue
			}
			p.mu.Lock()
			p.peak.goroutines = max(p.peak.goroutines, s.goroutines)
			p.peak.fds = max(p.peak.fds, s.fds)
			p.peak.rss = max(p.peak.rss, s.rss)
			p.mu.Unlock()
		}
	}()
	return func() daemonSample {
		close(stop)
		<-done
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.peak
	}
}

// fdDump lists iapd's open file descriptors and the host namespace's
// sockets, for a failure message.
func (p *daemonProbe) fdDump(bed *testbed.Bed) string {
	var b strings.Builder
	entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.pid))
	for _, e := range entries {
		target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", p.pid, e.Name()))
		fmt.Fprintf(&b, "fd %s -> %s\n", e.Name(), target)
	}
	out, _ := bed.Host.Command(context.Background(), "ss", "-tanpe").CombinedOutput()
	b.Write(out)
	return b.String()
}

// goroutineDump returns iapd's goroutines grouped by stack, for a failure
// message.
func (p *daemonProbe) goroutineDump() string {
	page, err := p.get("/debug/pprof/goroutine?debug=1")
	if err != nil {
		return "(no dump: " + err.Error() + ")"
	}
	return page
}

// soakRun is the load of one soak test and what came of it.
type soakRun struct {
	settings soakSettings
	host     *hostDialer
	deadline time.Time

	active, peakActive atomic.Int64

	mu       sync.Mutex
	counts   map[string]int // outcome by "kind: outcome"
	bytes    int64          // of completed transfers, each way
	failures []string       // what must not happen, at most a few kept
	failed   int
}

// outcomes of one client's turn.
const (
	outcomeCompleted = "completed"
	outcomeAborted   = "aborted by the client"
	outcomeCut       = "cut short by the proxy or the network"
	outcomeRefused   = "refused"
	outcomeHandled   = "handled as expected"
)

func (r *soakRun) count(kind, outcome string, bytes int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.counts == nil {
		r.counts = make(map[string]int)
	}
	r.counts[kind+": "+outcome]++
	if outcome == outcomeCompleted {
		r.bytes += bytes
	}
}

// fail records something that must not happen, such as a corrupted byte.
func (r *soakRun) fail(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failed++
	if len(r.failures) < 20 {
		r.failures = append(r.failures, fmt.Sprintf(format, args...))
	}
}

func (r *soakRun) problems() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	problems := slices.Clone(r.failures)
	if r.failed > len(r.failures) {
		problems = append(problems, fmt.Sprintf("and %d more", r.failed-len(r.failures)))
	}
	for _, kind := range soakKinds {
		if r.counts[kind.name+": "+outcomeCompleted] == 0 && r.counts[kind.name+": "+outcomeHandled] == 0 {
			problems = append(problems, fmt.Sprintf("no %s completed", kind.name))
		}
	}
	return problems
}

// soakKind is one thing a client does, with its share of the turns.
type soakKind struct {
	name   string
	weight int
	run    func(r *soakRun, rng *rand.Rand, seed [32]byte) (outcome string, bytes int64)
}

var soakKinds = []soakKind{
	{name: "socks5 tunnel (bulk)", weight: 30, run: func(r *soakRun, rng *rand.Rand, seed [32]byte) (string, int64) {
		return r.socks5Tunnel(rng, seed, "127.0.0.1:1080")
	}},
	{name: "socks5 tunnel (interactive, mixed listener)", weight: 15, run: func(r *soakRun, rng *rand.Rand, seed [32]byte) (string, int64) {
		return r.socks5Tunnel(rng, seed, "127.0.0.1:1081")
	}},
	{name: "socks5 tunnel (background, displaceable)", weight: 15, run: func(r *soakRun, rng *rand.Rand, seed [32]byte) (string, int64) {
		return r.socks5Tunnel(rng, seed, "127.0.0.1:1082")
	}},
	{name: "http connect tunnel (interactive, mixed listener)", weight: 10, run: func(r *soakRun, rng *rand.Rand, seed [32]byte) (string, int64) {
		return r.connectTunnel(rng, seed, "127.0.0.1:1081", "")
	}},
	{name: "http connect tunnel (bulk, credentials)", weight: 10, run: func(r *soakRun, rng *rand.Rand, seed [32]byte) (string, int64) {
		return r.connectTunnel(rng, seed, "127.0.0.1:3128", soakPassword)
	}},
	{name: "http post (bulk, credentials)", weight: 15, run: (*soakRun).httpPost},
	{name: "malformed or hostile client", weight: 5, run: (*soakRun).badClient},
}

// client runs turns until the load's deadline.
func (r *soakRun) client(id int) {
	rng := rand.New(rand.NewPCG(uint64(id), uint64(time.Now().UnixNano())))
	total := 0
	for _, k := range soakKinds {
		total += k.weight
	}
	for turn := 0; time.Now().Before(r.deadline); turn++ {
		pick := rng.IntN(total)
		kind := soakKinds[0]
		for _, k := range soakKinds {
			if pick < k.weight {
				kind = k
				break
			}
			pick -= k.weight
		}
		var seed [32]byte
		binary.LittleEndian.PutUint64(seed[:], uint64(id))
		binary.LittleEndian.PutUint64(seed[8:], uint64(turn))
		binary.LittleEndian.PutUint64(seed[16:], rng.Uint64())

		if n := r.active.Add(1); n > r.peakActive.Load() {
			r.peakActive.Store(n)
		}
		outcome, bytes := kind.run(r, rng, seed)
		r.active.Add(-1)
		r.count(kind.name, outcome, bytes)
		if strings.HasPrefix(outcome, outcomeRefused) || strings.HasPrefix(outcome, outcomeCut) {
			// As a real client would, wait a little before trying again.
			time.Sleep(time.Duration(100+rng.IntN(400)) * time.Millisecond)
		}
	}
}

// transferTimeout bounds one turn, slow readers included.
func (r *soakRun) transferTimeout() time.Duration {
	return 20*time.Second + time.Duration(r.settings.maxPayload/(50<<10))*time.Second
}

// socks5Tunnel sends a checksummed payload through a SOCKS5 tunnel to the
// echo server behind both.test.
func (r *soakRun) socks5Tunnel(rng *rand.Rand, seed [32]byte, proxy string) (string, int64) {
	ctx, cancel := context.WithTimeout(context.Background(), r.transferTimeout())
	defer cancel()
	c, err := r.host.dial(ctx, proxy)
	if err != nil {
		return fmt.Sprintf("%s (connecting: %v)", outcomeRefused, errorClass(err)), 0
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(r.transferTimeout()))

	req := binary.BigEndian.AppendUint16(append([]byte{5, 1, 0, 5, 1, 0, 3, 9}, "both.test"...), echoPort)
	if _, err := c.Write(req); err != nil {
		return outcomeCut, 0
	}
	reply := make([]byte, 12)
	if n, err := io.ReadFull(c, reply); err != nil {
		return fmt.Sprintf("%s (after %d bytes of reply: %v)", outcomeCut, n, errorClass(err)), 0
	}
	if reply[0] != 5 || reply[1] != 0 || reply[2] != 5 {
		r.fail("SOCKS5 %s: unexpected replies % x", proxy, reply)
		return outcomeRefused, 0
	}
	if reply[3] != 0 {
		return fmt.Sprintf("%s (SOCKS5 reply %d)", outcomeRefused, reply[3]), 0
	}
	return r.echoTransfer(rng, seed, c, bufio.NewReader(c), proxy)
}

// connectTunnel sends a checksummed payload through an HTTP CONNECT tunnel.
func (r *soakRun) connectTunnel(rng *rand.Rand, seed [32]byte, proxy, password string) (string, int64) {
	ctx, cancel := context.WithTimeout(context.Background(), r.transferTimeout())
	defer cancel()
	c, err := r.host.dial(ctx, proxy)
	if err != nil {
		return outcomeRefused, 0
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(r.transferTimeout()))

	target := net.JoinHostPort("both.test", strconv.Itoa(echoPort))
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if password != "" {
		req += "Proxy-Authorization: Basic " + basicAuth("soak", password) + "\r\n"
	}
	if _, err := io.WriteString(c, req+"\r\n"); err != nil {
		return outcomeCut, 0
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return fmt.Sprintf("%s (no CONNECT response: %v)", outcomeCut, errorClass(err)), 0
	}
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode != http.StatusServiceUnavailable && resp.StatusCode != http.StatusBadGateway && resp.StatusCode != http.StatusGatewayTimeout {
			r.fail("CONNECT through %s: status %d", proxy, resp.StatusCode)
		}
		return fmt.Sprintf("%s (status %d)", outcomeRefused, resp.StatusCode), 0
	}
	return r.echoTransfer(rng, seed, c, br, proxy)
}

// echoTransfer writes a payload drawn from seed to c while reading its
// echo from br, checking every byte against the same stream. It aborts,
// reads slowly, or half-closes and reads to the end, as rng decides.
func (r *soakRun) echoTransfer(rng *rand.Rand, seed [32]byte, c *net.TCPConn, br *bufio.Reader, via string) (string, int64) {
	size := 1 + rng.IntN(r.settings.maxPayload)
	mode := rng.IntN(10)
	abort := mode == 0 // with a reset, part way
	slow := mode == 1  // small reads with pauses
	abortAt := rng.IntN(size)

	sent := make(chan [sha256.Size]byte, 1)
	wrng := rand.New(rand.NewPCG(rng.Uint64(), rng.Uint64())) // the writer's own
	go func() {
		src := rand.NewChaCha8(seed)
		h := sha256.New()
		buf := make([]byte, 32<<10)
		for done := 0; done < size; {
			n := min(len(buf), size-done, 1+wrng.IntN(len(buf)))
			if abort && done+n > abortAt {
				// An abort sends a reset instead of a FIN.
				c.SetLinger(0)
				c.Close()
				return
			}
			src.Read(buf[:n])
			h.Write(buf[:n])
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
			done += n
		}
		c.CloseWrite()
		sent <- [sha256.Size]byte(h.Sum(nil))
	}()

	expect := rand.NewChaCha8(seed)
	h := sha256.New()
	buf := make([]byte, 32<<10)
	want := make([]byte, len(buf))
	var got int
	var readErr error
	for {
		limit := len(buf)
		if slow {
			limit = 1 << 10
		}
		n, err := br.Read(buf[:limit])
		readErr = err
		if n > 0 {
			if got+n > size {
				r.fail("%s: echo of %d bytes is longer than the %d sent", via, got+n, size)
				return outcomeCut, 0
			}
			expect.Read(want[:n])
			if !bytes.Equal(buf[:n], want[:n]) {
				r.fail("%s: echo differs from what was sent at byte %d of %d", via, got+firstDiff(buf[:n], want[:n]), size)
				return outcomeCut, 0
			}
			h.Write(buf[:n])
			got += n
			if slow {
				time.Sleep(5 * time.Millisecond)
			}
		}
		if err != nil {
			break
		}
	}
	if abort {
		return outcomeAborted, 0
	}
	if got != size {
		return fmt.Sprintf("%s (echo: %v)", outcomeCut, errorClass(readErr)), 0
	}
	select {
	case sum := <-sent:
		if sum != [sha256.Size]byte(h.Sum(nil)) {
			r.fail("%s: checksum of the echo differs from the payload's", via)
			return outcomeCut, 0
		}
	case <-time.After(time.Second):
		r.fail("%s: echo complete before the payload was sent", via)
		return outcomeCut, 0
	}
	return outcomeCompleted, int64(size)
}

// errorClass names the kind of a client's read error for the report.
func errorClass(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return "none"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return err.Error()
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

func basicAuth(user, password string) string {
	req, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
	req.SetBasicAuth(user, password)
	return strings.TrimPrefix(req.Header.Get("Authorization"), "Basic ")
}

// httpPost sends a checksummed payload as a POST body through the HTTP
// front end and checks the echoed response body.
func (r *soakRun) httpPost(rng *rand.Rand, seed [32]byte) (string, int64) {
	ctx, cancel := context.WithTimeout(context.Background(), r.transferTimeout())
	defer cancel()
	c, err := r.host.dial(ctx, "127.0.0.1:3128")
	if err != nil {
		return outcomeRefused, 0
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(r.transferTimeout()))

	size := 1 + rng.IntN(r.settings.maxPayload)
	target := net.JoinHostPort("both.test", strconv.Itoa(httpEchoPort))
	head := "POST http://" + target + "/echo HTTP/1.1\r\nHost: " + target + "\r\nProxy-Authorization: Basic " + basicAuth("soak", soakPassword) +
		"\r\nContent-Length: " + strconv.Itoa(size) + "\r\nConnection: close\r\n\r\n"
	go func() {
		if _, err := io.WriteString(c, head); err != nil {
			return
		}
		src := rand.NewChaCha8(seed)
		buf := make([]byte, 32<<10)
		for done := 0; done < size; {
			n := min(len(buf), size-done)
			src.Read(buf[:n])
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
			done += n
		}
	}()

	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return fmt.Sprintf("%s (no response: %v)", outcomeCut, errorClass(err)), 0
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode/100 != 5 {
			r.fail("POST: status %d", resp.StatusCode)
		}
		return fmt.Sprintf("%s (status %d)", outcomeRefused, resp.StatusCode), 0
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || len(body) != size {
		return fmt.Sprintf("%s (body of %d of %d bytes: %v)", outcomeCut, len(body), size, errorClass(err)), 0
	}
	want := make([]byte, size)
	rand.NewChaCha8(seed).Read(want)
	if sha256.Sum256(body) != sha256.Sum256(want) {
		r.fail("POST: checksum of the response differs from the payload's at byte %d of %d", firstDiff(body, want), size)
		return outcomeCut, 0
	}
	return outcomeCompleted, int64(size)
}

// badClient misbehaves in one of several ways and checks iapd's reply.
func (r *soakRun) badClient(rng *rand.Rand, _ [32]byte) (string, int64) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	proxy := []string{"127.0.0.1:1080", "127.0.0.1:1081", "127.0.0.1:3128"}[rng.IntN(3)]
	c, err := r.host.dial(ctx, proxy)
	if err != nil {
		return fmt.Sprintf("%s (connecting: %v)", outcomeRefused, errorClass(err)), 0
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))

	switch rng.IntN(4) {
	case 0: // garbage
		garbage := make([]byte, 1+rng.IntN(512))
		for i := range garbage {
			garbage[i] = byte(rng.IntN(256))
		}
		garbage[0] = 0x16 // no protocol starts with it
		c.Write(garbage)
		c.CloseWrite()
		if out, _ := io.ReadAll(c); len(out) > 0 && proxy != "127.0.0.1:3128" {
			r.fail("garbage to %s: answer %q, want the connection closed", proxy, out)
		}
	case 1: // trickle: one byte of a greeting now and then
		start := time.Now()
		for _, b := range []byte{5, 1, 0, 5, 1, 0, 1} {
			if _, err := c.Write([]byte{b}); err != nil {
				break
			}
			time.Sleep(700 * time.Millisecond)
		}
		io.ReadAll(c)
		if took := time.Since(start); took > 10*time.Second {
			r.fail("trickling client on %s held for %v, want closed at the 2s handshake timeout", proxy, took)
		}
	case 2: // wrong password
		target := net.JoinHostPort("both.test", strconv.Itoa(httpEchoPort))
		c.Close()
		c, err = r.host.dial(ctx, "127.0.0.1:3128")
		if err != nil {
			return outcomeRefused, 0
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(15 * time.Second))
		// Another user name than the good clients': failures slow down
		// the logins of the user name that failed, from that address.
		io.WriteString(c, "GET http://"+target+"/ HTTP/1.1\r\nHost: "+target+"\r\nProxy-Authorization: Basic "+basicAuth("guesser", "guess")+"\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return outcomeCut, 0
		}
		if resp.StatusCode != http.StatusProxyAuthRequired {
			r.fail("wrong password: status %d, want 407", resp.StatusCode)
		}
	case 3: // a local target: iapd's own profiling port
		if proxy == "127.0.0.1:3128" {
			proxy = "127.0.0.1:1080"
			c.Close()
			if c, err = r.host.dial(ctx, proxy); err != nil {
				return outcomeRefused, 0
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(15 * time.Second))
		}
		req := binary.BigEndian.AppendUint16([]byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1}, 6061)
		c.Write(req)
		reply := make([]byte, 12)
		if _, err := io.ReadFull(c, reply); err != nil {
			return outcomeCut, 0
		}
		if reply[3] != 0x02 {
			r.fail("local target through %s: reply % x, want 02 (not allowed)", proxy, reply)
		}
	}
	return outcomeHandled, 0
}

// policy returns the soak policy of the given reload, 0 for the first
// start. Reloads alternate background's listener between socks5 and mixed,
// which replaces its front end under load, and move the cap of cell, the
// idle timeout and the delay after failed logins.
func (r *soakRun) policy(reload int) string {
	s := r.settings
	protocol, cellCap, idle, delay := "socks5", s.clients/4, s.idleTimeout, 20*time.Millisecond
	if reload%2 == 1 {
		protocol, cellCap, idle, delay = "mixed", s.clients/5, 2*s.idleTimeout, 40*time.Millisecond
	}
	return strings.NewReplacer(
		"BG_PROTOCOL", protocol,
		"CELL_CAP", strconv.Itoa(cellCap),
		"LISTENER_CAP", strconv.Itoa(s.clients/10),
		"IDLE", idle.String(),
		"AUTH_DELAY", delay.String(),
	).Replace(soakPolicy)
}

// injectFaults takes wifi and cell down in turn, for flapFor every
// flapEvery, and reloads a changed policy after each flap, until the load's
// deadline. It returns the numbers of flaps and reloads. It runs on the
// test's goroutine, as the bed's methods fail the test on errors.
func (r *soakRun) injectFaults(t *testing.T, bed *testbed.Bed, d *testbed.Iapd) (flaps, reloads int) {
	uplinks := bed.Uplinks()
	for {
		next := time.Now().Add(r.settings.flapEvery)
		if next.After(r.deadline) {
			return flaps, reloads
		}
		time.Sleep(time.Until(next))
		u := uplinks[flaps%len(uplinks)]
		u.LinkDown(t)
		time.Sleep(r.settings.flapFor)
		u.LinkUp(t)
		flaps++

		if err := os.WriteFile(d.PolicyPath, []byte(r.policy(reloads+1)), 0o600); err != nil {
			t.Fatalf("writing the policy: %v", err)
		}
		if _, stderr, code := d.CLI(t, "reload"); code != 0 {
			t.Errorf("iapd reload: exit %d: %s", code, stderr)
			continue
		}
		reloads++
	}
}

// report returns the figures of the run as text for the log and docs.
func (r *soakRun) report(before, peak, after daemonSample, flaps, reloads, displaced int) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	s := r.settings
	fmt.Fprintf(&b, "soak %s: %d client workers for %v, transfers of 1 byte to %d KiB\n", s.name, s.clients, s.duration, s.maxPayload>>10)
	fmt.Fprintf(&b, "peak concurrent client connections: %d\n", r.peakActive.Load())
	fmt.Fprintf(&b, "faults: %d link flaps (%v down every %v), %d policy reloads, %d connections displaced, idle timeout %v or %v\n",
		flaps, s.flapFor, s.flapEvery, reloads, displaced, s.idleTimeout, 2*s.idleTimeout)
	keys := make([]string, 0, len(r.counts))
	total := 0
	for k, n := range r.counts {
		keys = append(keys, k)
		total += n
	}
	slices.Sort(keys)
	fmt.Fprintf(&b, "turns: %d\n", total)
	for _, k := range keys {
		fmt.Fprintf(&b, "  %s: %d\n", k, r.counts[k])
	}
	fmt.Fprintf(&b, "bytes of completed transfers, each way: %d (%.1f MiB)\n", r.bytes, float64(r.bytes)/(1<<20))
	fmt.Fprintf(&b, "corrupted or lost bytes in completed transfers, and wrong answers: %d\n", r.failed)
	fmt.Fprintf(&b, "iapd before: %s\n", before)
	fmt.Fprintf(&b, "iapd peak:   %s\n", peak)
	fmt.Fprintf(&b, "iapd after:  %s\n", after)
	fmt.Fprintf(&b, "bounds: goroutines +%d, file descriptors +%d, heap in use +%d MiB\n", maxGoroutineGrowth, maxFDGrowth, maxHeapGrowth>>20)
	return b.String()
}
