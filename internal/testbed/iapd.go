package testbed

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Numbers of the routing tables and rules iapd installs with the policy's
// default routing settings: table RoutingTable+i for access point i, lookup
// rules at RulePriority and unreachable rules right after.
const (
	RoutingTable    = 18100
	RoutingTableMax = RoutingTable + 255 // highest table number checked for leftovers
	RulePriority    = 18100
)

const (
	readyTimeout = 10 * time.Second
	stopTimeout  = 10 * time.Second
)

var build struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// Binary builds ./cmd/iapd of the module the test runs in, once per test
// process, and returns the path of the executable. A build failure fails t.
// The executable lives in a temporary directory that Main removes.
func Binary(t testing.TB) string {
	t.Helper()
	build.once.Do(func() {
		build.path, build.err = buildBinary()
	})
	if build.err != nil {
		t.Fatalf("building iapd: %v", build.err)
	}
	return build.path
}

func buildBinary() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("finding the go command: %w", err)
	}
	build.dir, err = os.MkdirTemp("", "iapd-testbed-")
	if err != nil {
		return "", fmt.Errorf("creating build directory: %w", err)
	}
	path := filepath.Join(build.dir, "iapd")
	cmd := exec.Command(goTool, "build", "-o", path, "./cmd/iapd")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/iapd in %s: %w\n%s", root, err, out)
	}
	return path, nil
}

// moduleRoot walks up from the working directory, which go test sets to the
// package's directory, to the directory holding go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("reading working directory: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("finding module root: no go.mod above the working directory")
		}
		dir = parent
	}
}

// ArtifactDir returns testdata/artifacts at the module root, created when
// missing, where tests keep files for people to look at (screenshots).
// The directory is ignored by git.
func ArtifactDir(t testing.TB) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "testdata", "artifacts")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("creating artifact directory: %v", err)
	}
	return dir
}

// Main runs the tests of m and then removes the binary that Binary built.
// Call it from TestMain as os.Exit(testbed.Main(m)).
func Main(m *testing.M) int {
	code := m.Run()
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
	return code
}

// WritePolicy writes policy to a new file in t's temporary directory and
// returns its path.
func WritePolicy(t testing.TB, policy string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "iapd.yaml")
	if err := os.WriteFile(path, []byte(policy), 0o600); err != nil {
		t.Fatalf("writing policy: %v", err)
	}
	return path
}

// Iapd is an iapd process running in a bed's host namespace. Its methods
// are safe for concurrent use.
type Iapd struct {
	PolicyPath string
	Socket     string // the control socket, in the test's temporary directory

	cmd   *exec.Cmd
	ready chan struct{} // closed when iapd logged "ready"
	done  chan struct{} // closed when the process has exited and its log is read
	err   error         // result of Wait; read only after done

	mu      sync.Mutex // protects logs and stopped
	logs    []string
	stopped bool // Stop ended the process, so cleanup expects it gone
}

// StartOptions are the less common settings of StartWith.
type StartOptions struct {
	// Env entries ("NAME=value") are added to iapd's environment, which is
	// where password_env variables go.
	Env []string
	// Args are added to the command line of "iapd run".
	Args []string
	// Binary is the iapd executable to run. Default: the one Binary
	// builds from the module.
	Binary string
	// Detach runs iapd in a process group of its own, so that a Ctrl-C
	// in the terminal reaches only the caller, which stops iapd in its
	// cleanup and can still check how it exits.
	Detach bool
}

// Start runs "iapd run" with policy in the host namespace and waits until
// it logs that it is ready. env entries ("NAME=value") are added to the
// environment of iapd, which is where password_env variables go. At
// cleanup Start sends SIGTERM and checks that iapd exits 0 and leaves no
// routing rule or table behind.
func (b *Bed) Start(t testing.TB, policy string, env ...string) *Iapd {
	t.Helper()
	return b.StartWith(t, policy, StartOptions{Env: env})
}

// StartWith is Start with options. The control socket is a new path in
// t's temporary directory, so that iapd processes of tests never meet.
func (b *Bed) StartWith(t testing.TB, policy string, opts StartOptions) *Iapd {
	t.Helper()
	bin := opts.Binary
	if bin == "" {
		bin = Binary(t)
	}
	d := &Iapd{
		PolicyPath: WritePolicy(t, policy),
		Socket:     filepath.Join(t.TempDir(), "iapd.sock"),
		ready:      make(chan struct{}),
		done:       make(chan struct{}),
	}

	// ip netns exec runs the binary in place of itself, so the process
	// started here is iapd and receives the signals sent to it.
	args := append([]string{"run", "-c", d.PolicyPath, "--log-format", "json", "--log-level", "debug", "--socket", d.Socket}, opts.Args...)
	d.cmd = b.Host.Command(context.Background(), bin, args...)
	d.cmd.Env = append(withoutProxyVariables(os.Environ()), opts.Env...)
	if opts.Detach {
		d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	}
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatalf("starting iapd: %v", err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting iapd: %v", err)
	}

	sink := newLogSink(t)
	go func() {
		d.readLog(stderr, sink)
		// Wait closes the pipe, so it runs only after the log is read.
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() { d.stop(t, b) })

	select {
	case <-d.ready:
		return d
	case <-d.done:
		t.Fatalf("iapd exited before it was ready: %v", d.err)
	case <-time.After(readyTimeout):
		t.Fatalf("iapd did not log %q within %v", "ready", readyTimeout)
	}
	return nil
}

func (d *Iapd) readLog(r io.Reader, sink *logSink) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		sink.logf("iapd: %s", line)
		d.mu.Lock()
		d.logs = append(d.logs, line)
		d.mu.Unlock()

		var rec struct {
			Msg string `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "ready" {
			select {
			case <-d.ready:
			default:
				close(d.ready)
			}
		}
	}
	// Drain what a too long line left, so that iapd never blocks writing.
	io.Copy(io.Discard, r)
}

// LogRecord is one JSON record of iapd's log.
type LogRecord struct {
	Time  time.Time
	Level string
	Msg   string
	Attrs map[string]any // every other key, as JSON decoded it
}

// Attr returns the attribute key as a string, or "" when it is absent.
func (r LogRecord) Attr(key string) string {
	v, ok := r.Attrs[key]
	if !ok {
		return ""
	}
	if s, ok := v.(string); ok {
		return s
	}
	return fmt.Sprint(v)
}

// Records returns iapd's log records so far whose message is msg and
// whose attributes include attrs, oldest first.
func (d *Iapd) Records(msg string, attrs map[string]string) []LogRecord {
	d.mu.Lock()
	lines := append([]string(nil), d.logs...)
	d.mu.Unlock()

	var found []LogRecord
	for _, line := range lines {
		var fields map[string]any
		if json.Unmarshal([]byte(line), &fields) != nil || fields["msg"] != msg {
			continue
		}
		rec := LogRecord{Msg: msg, Attrs: fields}
		rec.Level, _ = fields["level"].(string)
		if ts, ok := fields["time"].(string); ok {
			rec.Time, _ = time.Parse(time.RFC3339Nano, ts)
		}
		matches := true
		for k, v := range attrs {
			if rec.Attr(k) != v {
				matches = false
			}
		}
		if matches {
			found = append(found, rec)
		}
	}
	return found
}

// WaitRecord waits until iapd logs a record like Records finds that is
// later than after, and returns the first. It fails t when none comes
// within timeout.
func (d *Iapd) WaitRecord(t testing.TB, timeout time.Duration, after time.Time, msg string, attrs map[string]string) LogRecord {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, rec := range d.Records(msg, attrs) {
			if rec.Time.After(after) {
				return rec
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("iapd did not log %q with %v within %v", msg, attrs, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Explain runs "iapd explain" on the policy d serves, in the host
// namespace, with args added (--app, --target, --probe), and returns its
// standard output. A failure to run fails t.
func (b *Bed) Explain(t testing.TB, d *Iapd, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := b.Host.Command(ctx, Binary(t), append([]string{"explain", "-c", d.PolicyPath}, args...)...)
	cmd.Env = withoutProxyVariables(os.Environ())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	t.Logf("iapd explain %s: %v\n%s", strings.Join(args, " "), err, stdout.String())

	// explain exits 1 exactly when the connection would be refused.
	refused := strings.Contains(stdout.String(), "\nwould use: none")
	var exitErr *exec.ExitError
	switch {
	case err == nil && refused:
		t.Errorf("iapd explain %s: exit 0, but it would refuse the connection", strings.Join(args, " "))
	case err != nil && !(refused && errors.As(err, &exitErr) && exitErr.ExitCode() == 1):
		t.Fatalf("iapd explain %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// Pid returns the process ID of iapd, for reading its state under /proc.
// ip netns exec runs iapd in place of itself, so this is iapd's own.
func (d *Iapd) Pid() int { return d.cmd.Process.Pid }

// Logs returns what iapd wrote to standard error so far, one JSON record a
// line.
func (d *Iapd) Logs() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return strings.Join(d.logs, "\n")
}

// stop sends SIGTERM and checks the exit status and that iapd removed its
// routing rules and tables.
func (d *Iapd) stop(t testing.TB, b *Bed) {
	t.Helper()
	d.mu.Lock()
	stopped := d.stopped
	d.mu.Unlock()
	select {
	case <-d.done:
		select {
		case <-d.ready:
			if !stopped {
				t.Errorf("iapd exited before the test ended: %v", d.err)
			}
		default: // Start has reported it
		}
	default:
		if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Errorf("sending SIGTERM to iapd: %v", err)
		}
		select {
		case <-d.done:
			if d.err != nil {
				t.Errorf("iapd after SIGTERM: %v, want exit status 0", d.err)
			}
		case <-time.After(stopTimeout):
			d.cmd.Process.Kill()
			<-d.done
			t.Errorf("iapd did not exit within %v of SIGTERM", stopTimeout)
		}
	}
	for _, left := range b.Leftovers(t) {
		t.Errorf("iapd left behind in %s: %s", b.Host.Name, left)
	}
}

// Signal sends sig to iapd.
func (d *Iapd) Signal(t testing.TB, sig os.Signal) {
	t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("sending %v to iapd: %v", sig, err)
	}
}

// Stop sends SIGTERM and waits up to timeout for iapd to exit. It returns
// how long the exit took and the exit error, nil for exit status 0.
func (d *Iapd) Stop(t testing.TB, timeout time.Duration) (time.Duration, error) {
	t.Helper()
	d.mu.Lock()
	d.stopped = true
	d.mu.Unlock()
	started := time.Now()
	d.Signal(t, syscall.SIGTERM)
	select {
	case <-d.done:
		return time.Since(started), d.err
	case <-time.After(timeout):
		d.cmd.Process.Kill()
		<-d.done
		t.Fatalf("iapd did not exit within %v of SIGTERM", timeout)
	}
	return 0, nil
}

// Exited returns a channel that is closed when iapd has exited.
func (d *Iapd) Exited() <-chan struct{} { return d.done }

// CLI runs "iapd args... -socket SOCKET" with the socket of d and returns
// its standard output, standard error and exit code. The control commands
// reach iapd through the socket file, so they run outside the bed.
func (d *Iapd) CLI(t testing.TB, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Flags must come before positional arguments; the control commands
	// take none.
	full := append(append([]string{args[0]}, "-socket", d.Socket), args[1:]...)
	cmd := exec.CommandContext(ctx, Binary(t), full...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exitErr *exec.ExitError
	switch {
	case errors.As(err, &exitErr):
		code = exitErr.ExitCode()
	case err != nil:
		t.Fatalf("running iapd %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("iapd %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, out.String(), errOut.String())
	return out.String(), errOut.String(), code
}

var tableRE = regexp.MustCompile(`\btable (\d+)\b`)

// Leftovers lists the rules at iapd's priority and the routes in iapd's
// tables that exist in the host namespace.
func (b *Bed) Leftovers(t testing.TB) []string {
	t.Helper()
	var left []string
	for _, family := range []string{"-4", "-6"} {
		for _, line := range strings.Split(b.Host.IP(t, family, "rule", "show"), "\n") {
			if strings.HasPrefix(line, strconv.Itoa(RulePriority)+":") || strings.HasPrefix(line, strconv.Itoa(RulePriority+1)+":") {
				left = append(left, "rule "+strings.TrimSpace(line))
			}
		}
		for _, line := range strings.Split(b.Host.IP(t, family, "route", "show", "table", "all"), "\n") {
			m := tableRE.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			if n, _ := strconv.Atoi(m[1]); n >= RoutingTable && n <= RoutingTableMax {
				left = append(left, "route "+strings.TrimSpace(line))
			}
		}
	}
	return left
}
