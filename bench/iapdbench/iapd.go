package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// readyTimeout bounds how long iapd may take to open its listeners.
const readyTimeout = 15 * time.Second

// stopTimeout bounds how long iapd may take to exit after SIGTERM before
// it is killed.
const stopTimeout = 10 * time.Second

// pprofEnv names the environment variable that makes iapd serve
// net/http/pprof on the loopback address it holds.
const pprofEnv = "IAPD_PPROF"

// iapd is one running iapd child process.
type iapd struct {
	cmd    *exec.Cmd
	pid    int
	stderr *tailBuffer

	socks, socksAuth, http netip.AddrPort
	pprof                  string // host:port of net/http/pprof; empty when not asked for

	exited  chan struct{} // closed when the process has exited
	waitErr error         // valid after exited is closed
	stopped sync.Once
	stopErr error
}

// policyTemplate is the policy the benchmark serves: one access point on
// the default route whose resolver is the benchmark's DNS server, one app,
// and one listener per proxy mode. The app allows local targets, because
// the benchmark's sinks listen on loopback, which iapd refuses otherwise,
// and the listeners take up to iapd's maximum of clients, since the memory
// measure holds more idle tunnels than the default cap of 1024.
const policyTemplate = `# Written by iapdbench; removed when the run ends.
listeners:
  - listen: %[1]s
    protocol: socks5
    app: bench
    max_connections: 1000000
  - listen: %[2]s
    protocol: socks5
    max_connections: 1000000
    users:
      - name: %[5]s
        password_env: %[6]s
        app: bench
  - listen: %[3]s
    protocol: http
    app: bench
    max_connections: 1000000
apps:
  bench:
    access_point: loopback
    allow_local_targets: true
access_points:
  loopback:
    interface: default
    dns: [%[4]s]
`

// startIapd writes a policy, starts iapd on it and waits until it serves.
// With pprof set to true, iapd is asked to serve net/http/pprof.
func startIapd(ctx context.Context, path string, env *environment, pprof bool) (*iapd, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("iapd binary %s: %w (build it with make build, or pass -iapd)", path, err)
	}
	ports, err := freePorts(4)
	if err != nil {
		return nil, err
	}
	d := &iapd{
		socks:     ports[0],
		socksAuth: ports[1],
		http:      ports[2],
		stderr:    newTailBuffer(64 << 10),
		exited:    make(chan struct{}),
	}

	policy := fmt.Sprintf(policyTemplate, d.socks, d.socksAuth, d.http, env.dns.addr, benchUser, benchPasswordEnv)
	policyPath := filepath.Join(env.dir, fmt.Sprintf("policy-%d.yaml", d.socks.Port()))
	if err := os.WriteFile(policyPath, []byte(policy), 0o600); err != nil {
		return nil, fmt.Errorf("writing policy: %w", err)
	}

	// Per-connection records are logged at debug, so info costs nothing
	// per connection and shows the ready record.
	d.cmd = exec.Command(path, "run", "-c", policyPath, "-log-level", "info", "-log-format", "text")
	d.cmd.Env = append(os.Environ(), benchPasswordEnv+"="+benchPassword)
	if pprof {
		d.pprof = ports[3].String()
		d.cmd.Env = append(d.cmd.Env, pprofEnv+"="+d.pprof)
	}
	d.cmd.Stdout = d.stderr
	stderrPipe, err := d.cmd.StderrPipe()
	if err != nil {
		return nil, fmt.Errorf("starting iapd: %w", err)
	}
	// Its own process group, so that Ctrl-C on the terminal reaches only
	// the benchmark, which then stops iapd itself.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", path, err)
	}
	d.pid = d.cmd.Process.Pid

	// Wait closes the pipe, so it runs only once the reader has seen the
	// end of iapd's output. Otherwise the last lines before an exit could
	// be missing from the error message.
	ready := make(chan struct{})
	go func() {
		d.readStderr(stderrPipe, ready)
		d.waitErr = d.cmd.Wait()
		close(d.exited)
	}()

	timer := time.NewTimer(readyTimeout)
	defer timer.Stop()
	select {
	case <-ready:
	case <-d.exited:
		return nil, fmt.Errorf("iapd exited before it was ready (%v); policy %s; its output:\n%s", d.waitErr, policyPath, d.stderr.String())
	case <-timer.C:
		d.stop()
		return nil, fmt.Errorf("iapd did not log \"ready\" within %s; policy %s; its output:\n%s", readyTimeout, policyPath, d.stderr.String())
	case <-ctx.Done():
		d.stop()
		return nil, ctx.Err()
	}
	return d, nil
}

// readStderr copies iapd's log into the tail buffer and closes ready at
// the record with msg=ready. It keeps reading until the process closes
// its end, so iapd never blocks on a full pipe.
func (d *iapd) readStderr(r io.Reader, ready chan<- struct{}) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	signalled := false
	for sc.Scan() {
		line := sc.Bytes()
		d.stderr.Write(line)
		d.stderr.Write([]byte{'\n'})
		if !signalled && isReadyRecord(line) {
			close(ready)
			signalled = true
		}
	}
	io.Copy(d.stderr, r) // a line longer than 1 MiB ends the scanner
}

// isReadyRecord reports whether line is iapd's "ready" record, in text or
// JSON format.
func isReadyRecord(line []byte) bool {
	return bytes.Contains(line, []byte(`"msg":"ready"`)) ||
		bytes.HasSuffix(line, []byte(" msg=ready")) ||
		bytes.Contains(line, []byte(" msg=ready "))
}

// listenerFor returns the listener address that serves m.
func (d *iapd) listenerFor(m mode) netip.AddrPort {
	switch {
	case m.kind == kindHTTPConnect:
		return d.http
	case m.user != "":
		return d.socksAuth
	default:
		return d.socks
	}
}

// alive returns an error with iapd's output if the process has exited.
func (d *iapd) alive() error {
	select {
	case <-d.exited:
		return fmt.Errorf("iapd exited during the run (%v); its output:\n%s", d.waitErr, d.stderr.String())
	default:
		return nil
	}
}

// stop sends SIGTERM, waits for the exit and kills iapd if it takes too
// long. It returns an error when iapd had already died or had to be
// killed; calling it again returns the same result.
func (d *iapd) stop() error {
	d.stopped.Do(func() {
		if err := d.alive(); err != nil {
			d.stopErr = err
			return
		}
		d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(stopTimeout):
			d.cmd.Process.Kill()
			<-d.exited
			d.stopErr = fmt.Errorf("iapd did not exit within %s of SIGTERM and was killed; its output:\n%s", stopTimeout, d.stderr.String())
		}
	})
	return d.stopErr
}

// iapdVersion returns the output of "iapd version", or "" when it fails.
func iapdVersion(path string) string {
	out, err := exec.Command(path, "version").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

// freePorts returns n distinct loopback ports that were free a moment ago.
// iapd opens them shortly after, so another process could take one in
// between; iapd then fails to start with an error that names the port.
//
// The ports come from below the ephemeral range. After the memory
// measures, tens of thousands of sockets in TIME-WAIT can hold every
// ephemeral port, and a listener on port 0 then fails with "address
// already in use".
func freePorts(n int) ([]netip.AddrPort, error) {
	var (
		ports []netip.AddrPort
		lns   []net.Listener
	)
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	// Concurrent runs start their search at different ports, so that
	// they seldom try the same ones.
	low := ephemeralLow()
	for port := low - 1 - os.Getpid()%2000; port >= listenPortFloor && len(ports) < n; port-- {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).AddrPort())
	}
	if len(ports) < n {
		return nil, fmt.Errorf("finding a free loopback port: none free between %d and %d", listenPortFloor, low-1)
	}
	return ports, nil
}

// listenPortFloor is the lowest port that freePorts takes, above the
// ports that services usually have.
const listenPortFloor = 20000

// ephemeralLow returns the first port of the kernel's ephemeral range,
// from /proc/sys/net/ipv4/ip_local_port_range, or Linux's default 32768.
func ephemeralLow() int {
	data, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	fields := strings.Fields(string(data))
	if len(fields) == 0 {
		return 32768
	}
	low, err := strconv.Atoi(fields[0])
	if err != nil || low <= listenPortFloor+2000 {
		return 32768
	}
	return low
}

// tailBuffer keeps the last bytes written to it. It is safe for
// concurrent use.
type tailBuffer struct {
	mu   sync.Mutex // protects buf
	buf  []byte
	size int
	cut  bool // bytes were dropped from the front
}

func newTailBuffer(size int) *tailBuffer { return &tailBuffer{size: size} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.size; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
		t.cut = true
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.buf) == 0 {
		return "(no output)"
	}
	if t.cut {
		return "[earlier output dropped]\n" + string(t.buf)
	}
	return string(t.buf)
}

// errNoPprof means iapd does not serve net/http/pprof at the address it
// was given, which happens when the binary predates IAPD_PPROF.
var errNoPprof = errors.New("iapd does not serve net/http/pprof (IAPD_PPROF not supported by this binary)")
