package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"

	"iapd/internal/netnstest"
	"iapd/internal/testbed"
)

func TestMain(m *testing.M) {
	os.Exit(testbed.Main(m))
}

// logWriter passes the bed's messages to t.Log.
type logWriter struct{ t *testing.T }

func (w logWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func TestPrivilegedBedServesAndCleansUp(t *testing.T) {
	netnstest.Require(t)
	p := testbed.NewProcess("iapd-bed-test", logWriter{t})
	closed := false
	t.Cleanup(func() {
		if !closed {
			p.Close()
		}
	})
	var s *session
	if err := p.Run(func() { s = setUp(p, testbed.Binary(t)) }); err != nil {
		t.Fatalf("setting up the bed: %v", err)
	}

	var text bytes.Buffer
	s.instructions(&text)
	host := s.bed.Host.Name
	for _, want := range []string{
		"ip netns exec " + host + " curl --socks5-hostname 127.0.0.1:1080 http://www.wifi.test/\n",
		"ip netns exec " + host + " " + s.bin + " events -socket " + s.iapd.Socket + "\n",
		"ip -n " + host + " link set wifi down\n",
	} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("instructions lack %q:\n%s", want, text.String())
		}
	}

	tests := []struct {
		name string
		args []string
		want string
	}{
		{name: "browser via wifi", args: []string{"--socks5-hostname", "127.0.0.1:1080", "http://www.wifi.test/"}, want: "uplink=wifi client=192.0.2.2\n"},
		{name: "mms via cell", args: []string{"--socks5-hostname", "127.0.0.1:1081", "http://both.test/"}, want: "uplink=cell client=192.0.2.2\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, code := s.bed.Curl(t, tt.args...)
			if code != 0 {
				t.Errorf("curl exit code %d, want 0", code)
			}
			if out != tt.want {
				t.Errorf("body %q, want %q", out, tt.want)
			}
		})
	}

	names := []string{host}
	for _, u := range s.bed.Uplinks() {
		names = append(names, u.NS.Name)
	}
	closed = true
	if err := p.Close(); err != nil {
		t.Errorf("cleanup: %v", err)
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	for _, name := range names {
		if strings.Contains(string(out), name) {
			t.Errorf("namespace %s left after cleanup", name)
		}
	}
	if _, err := os.Stat(s.iapd.PolicyPath); !os.IsNotExist(err) {
		t.Errorf("policy file %s after cleanup: %v, want it removed", s.iapd.PolicyPath, err)
	}
}
