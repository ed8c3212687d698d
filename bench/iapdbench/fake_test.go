package main

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	_ "net/http/pprof" // the fake serves the same endpoints iapd does
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/armon/go-socks5"
)

// fakeIapdEnv makes the test binary act as iapd: started as
// "TESTBINARY run -c POLICY ...", it serves the policy's three listeners
// with go-socks5 and a small CONNECT proxy, serves net/http/pprof on
// IAPD_PPROF, and logs the ready record. It lets the tests run every
// measure without a working iapd.
const fakeIapdEnv = "IAPDBENCH_FAKE_IAPD"

func TestMain(m *testing.M) {
	// The sink process inherits the environment, which may also ask for
	// the fake iapd, so the sinks go first.
	if mode := os.Getenv(sinkChildEnv); mode != "" {
		os.Exit(runSinkChild(mode))
	}
	if addr := os.Getenv(minimalProxyEnv); addr != "" {
		os.Exit(runMinimalProxy(addr))
	}
	if os.Getenv(fakeIapdEnv) == "1" {
		os.Exit(runFakeIapd(os.Args[1:]))
	}
	os.Exit(m.Run())
}

var listenLine = regexp.MustCompile(`(?m)^\s*- listen: (\S+)$`)

func runFakeIapd(args []string) int {
	if len(args) < 3 || args[0] != "run" || args[1] != "-c" {
		fmt.Fprintf(os.Stderr, "fake iapd: unexpected arguments %q\n", args)
		return 2
	}
	policy, err := os.ReadFile(args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake iapd:", err)
		return 1
	}
	addrs := listenLine.FindAllStringSubmatch(string(policy), -1)
	if len(addrs) != 3 {
		fmt.Fprintf(os.Stderr, "fake iapd: found %d listeners, want 3\n", len(addrs))
		return 1
	}

	quiet := log.New(io.Discard, "", 0)
	noAuth, _ := socks5.New(&socks5.Config{Logger: quiet})
	withAuth, _ := socks5.New(&socks5.Config{Logger: quiet,
		Credentials: socks5.StaticCredentials{benchUser: os.Getenv(benchPasswordEnv)}})
	servers := []func(net.Listener){
		func(ln net.Listener) { noAuth.Serve(ln) },
		func(ln net.Listener) { withAuth.Serve(ln) },
		serveFakeCONNECT,
	}
	for i, serve := range servers {
		ln, err := net.Listen("tcp", addrs[i][1])
		if err != nil {
			fmt.Fprintln(os.Stderr, "fake iapd:", err)
			return 1
		}
		go serve(ln)
	}
	if addr := os.Getenv(pprofEnv); addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fake iapd:", err)
			return 1
		}
		go http.Serve(ln, nil)
	}

	fmt.Fprintln(os.Stderr, "time=2026-01-01T00:00:00Z level=INFO msg=ready listeners=3")
	select {} // until SIGTERM
}

func serveFakeCONNECT(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			buf := make([]byte, 1024)
			n, err := c.Read(buf)
			if err != nil || !bytes.HasPrefix(buf[:n], []byte("CONNECT ")) {
				return
			}
			target := strings.Fields(string(buf[:n]))[1]
			up, err := net.Dial("tcp", target)
			if err != nil {
				io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
				return
			}
			defer up.Close()
			io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
			go func() {
				io.Copy(up, c)
				up.(*net.TCPConn).CloseWrite()
			}()
			io.Copy(c, up)
		}()
	}
}

// useFakeIapd returns the path that starts this test binary as the fake
// iapd.
func useFakeIapd(t *testing.T) string {
	t.Setenv(fakeIapdEnv, "1")
	path, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func TestRunBenchmarkWithFakeIapd(t *testing.T) {
	iapdPath := useFakeIapd(t)
	out := t.TempDir()
	args := []string{"-iapd", iapdPath, "-out", out, "-repeat", "1",
		"-bulk-mib", "4", "-streams", "2", "-setup-duration", "100ms", "-setup-workers", "2",
		"-tunnels", "20", "-dns-duration", "50ms", "-dns-workers", "2", "-peers", "none"}

	var stdout, stderr bytes.Buffer
	if code := run(args, &stdout, &stderr); code != 0 {
		t.Fatalf("run exited with %d:\n%s", code, stderr.String())
	}
	for _, want := range []string{
		"upload, 2 streams", "download, 1 stream", "setup latency p99", "proxy CPU",
		"RSS per tunnel", "goroutines per tunnel", "distinct names", "client CPU", "sink CPU",
		"upload, 4 streams", "tunnels open",
	} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, stdout.String())
		}
	}
	for _, mode := range []string{"socks5", "socks5-auth", "http"} {
		if !strings.Contains(stdout.String(), "|  "+mode+"|") && !strings.Contains(stdout.String(), mode+"|") {
			t.Errorf("table lacks column %q", mode)
		}
	}
	if strings.Contains(stdout.String(), "Errors:") {
		t.Errorf("table reports errors:\n%s", stdout.String())
	}
	for _, name := range []string{"results.json", "results.txt"} {
		if _, err := os.Stat(filepath.Join(out, name)); err != nil {
			t.Errorf("output: %v", err)
		}
	}
}

func TestRunProfileWithFakeIapd(t *testing.T) {
	iapdPath := useFakeIapd(t)
	dir := t.TempDir()
	args := []string{"-iapd", iapdPath, "-profile", dir, "-profile-duration", "1s",
		"-profile-mode", "socks5-auth", "-bulk-mib", "4", "-streams", "2", "-setup-workers", "2", "-tunnels", "10"}

	start := time.Now()
	var stdout, stderr bytes.Buffer
	if code := run(args, &stdout, &stderr); code != 0 {
		t.Fatalf("run exited with %d:\n%s", code, stderr.String())
	}
	if elapsed := time.Since(start); elapsed > 20*time.Second {
		t.Errorf("profiling took %v, want about 2 s", elapsed)
	}
	for _, phase := range []string{"bulk", "setup"} {
		for _, kind := range []string{"cpu", "allocs-before", "allocs-after"} {
			path := filepath.Join(dir, phase+"-"+kind+".pprof")
			info, err := os.Stat(path)
			if err != nil {
				t.Errorf("profile: %v", err)
				continue
			}
			if info.Size() == 0 {
				t.Errorf("%s is empty", path)
			}
		}
	}
}
