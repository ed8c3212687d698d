package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iapd/internal/testbed"
	"iapd/policy"
)

// quickStartPorts are the listener ports of config.example.yaml that the
// quick start in README.md uses.
var quickStartPorts = []string{"1080", "8080", "1081"}

// TestQuickStart serves config.example.yaml, with its listeners moved to
// free ports, and runs the quick start's curl commands from README.md
// against a web server on loopback, as a new user does after make run.
func TestQuickStart(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatalf("curl not installed (make setup-test installs it): %v", err)
	}
	example, err := os.ReadFile(filepath.Join("..", "..", "config.example.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	ports := make(map[string]string)
	text := string(example)
	for _, port := range quickStartPorts {
		ports[port] = freeLoopbackPort(t)
		text = strings.ReplaceAll(text, `"127.0.0.1:`+port+`"`, `"127.0.0.1:`+ports[port]+`"`)
	}
	config := testbed.WritePolicy(t, text)
	startExample(t, config)

	web := startPageServer(t)
	readme := readQuickStart(t)
	tests := []struct {
		name string
		args []string
	}{
		{name: "socks5 listener", args: []string{"--socks5-hostname", "127.0.0.1:" + ports["1080"]}},
		{name: "http listener", args: []string{"-x", "http://alice:example-password@127.0.0.1:" + ports["8080"]}},
		{name: "http connect", args: []string{"-p", "-x", "http://alice:example-password@127.0.0.1:" + ports["8080"]}},
		{name: "mixed listener", args: []string{"-x", "socks5h://127.0.0.1:" + ports["1081"]}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The README must show this command, with its own ports.
			readmeCommand := "curl " + strings.Join(readmeArgs(tt.args, ports), " ") + " http://127.0.0.1:8000/"
			if !strings.Contains(readme, readmeCommand) {
				t.Errorf("README.md does not show %q", readmeCommand)
			}
			args := append([]string{"-sS", "--max-time", "10", "-w", "\n%{http_code}"}, tt.args...)
			out, err := exec.Command("curl", append(args, web)...).CombinedOutput()
			if err != nil {
				t.Fatalf("curl %v: %v\n%s", tt.args, err, out)
			}
			if body, code := splitCode(string(out)); code != "200" || body != quickStartPage {
				t.Errorf("curl %v: status %s, body %q; want 200 and %q", tt.args, code, body, quickStartPage)
			}
		})
	}

	t.Run("wrong password", func(t *testing.T) {
		out, err := exec.Command("curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
			"-x", "http://alice:wrong@127.0.0.1:"+ports["8080"], web).CombinedOutput()
		if err != nil || string(out) != "407" {
			t.Errorf("curl with a wrong password: %q, %v; want status 407", out, err)
		}
	})
}

// TestMakeInstallLeavesLocalTargetsOut checks that the policy make install
// writes is the example without its quick start lines, so that no app of
// an installed host reaches local services unless its owner says so.
func TestMakeInstallLeavesLocalTargetsOut(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatalf("make not installed: %v", err)
	}
	dest := t.TempDir()
	cmd := exec.Command("make", "-C", filepath.Join("..", ".."), "install", "DESTDIR="+dest, "PREFIX=/usr")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make install DESTDIR=%s: %v\n%s", dest, err, out)
	}

	installed := filepath.Join(dest, "etc", "iapd", "iapd.yaml")
	p, err := policy.Load(installed)
	if err != nil {
		t.Fatalf("loading the installed policy: %v", err)
	}
	if len(p.Apps) == 0 {
		t.Fatal("the installed policy has no apps")
	}
	for name, app := range p.Apps {
		if app.AllowLocalTargets {
			t.Errorf("installed app %s allows local targets", name)
		}
	}
	unit, err := os.ReadFile(filepath.Join(dest, "etc", "systemd", "system", "iapd.service"))
	if err != nil {
		t.Fatalf("reading the installed unit: %v", err)
	}
	if strings.Contains(string(unit), "/usr/local/") {
		t.Errorf("the unit installed with PREFIX=/usr names /usr/local/:\n%s", unit)
	}
	if !strings.Contains(string(unit), "ExecStart=/usr/bin/iapd run") {
		t.Errorf("the unit installed with PREFIX=/usr does not start /usr/bin/iapd:\n%s", unit)
	}

	example, err := policy.Load(filepath.Join("..", "..", "config.example.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for name, app := range example.Apps {
		if !app.AllowLocalTargets {
			t.Errorf("example app %s does not allow local targets, which the quick start needs", name)
		}
	}
}

// quickStartPage is what the test's web server serves.
const quickStartPage = "quick start page\n"

// startPageServer serves quickStartPage on a loopback port and returns its
// URL.
func startPageServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, quickStartPage)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String() + "/"
}

// startExample runs iapd on config in this namespace until the test ends,
// with its control socket in a directory of the test, and waits for its
// "ready" record.
func startExample(t *testing.T, config string) {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), "iapd.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(testbed.Binary(t), "run", "-c", config)
	cmd.Env = append(os.Environ(), "RUNTIME_DIRECTORY="+t.TempDir())
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() {
			cmd.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if out, err := os.ReadFile(logPath); err == nil && t.Failed() {
			t.Logf("iapd's log:\n%s", out)
		}
	})

	waitUntil(t, "iapd to log ready", func() bool {
		out, _ := os.ReadFile(logPath)
		return strings.Contains(string(out), "msg=ready")
	})
}

// readQuickStart returns README.md.
func readQuickStart(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// readmeArgs turns curl arguments with the test's ports back into the
// README's, which use the example's ports.
func readmeArgs(args []string, ports map[string]string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		for readmePort, port := range ports {
			a = strings.ReplaceAll(a, "127.0.0.1:"+port, "127.0.0.1:"+readmePort)
		}
		out[i] = a
	}
	return out
}

// splitCode splits curl's output, written with -w "\n%{http_code}", into
// the body and the status code.
func splitCode(out string) (body, code string) {
	i := strings.LastIndex(out, "\n")
	if i < 0 {
		return "", out
	}
	return out[:i], out[i+1:]
}

// freeLoopbackPort returns a loopback TCP port that was free a moment ago.
func freeLoopbackPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
}
