package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// raceRules make the destination internet race with a short delay.
const raceRules = "    select: race\n    race_delay: 100ms\n"

func TestSOCKS5Race(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	tests := []struct {
		name        string
		dialA       dialBehaviour
		dialB       dialBehaviour
		wantOK      bool
		wantVia     string
		minTime     time.Duration
		maxTime     time.Duration
		wantDials   []string
		wantReports []string
	}{
		{
			name: "first connects", dialA: dialOK, dialB: dialOK, wantOK: true, wantVia: "a",
			maxTime: 90 * time.Millisecond, wantDials: []string{"a " + echo}, wantReports: []string{"a ok"},
		},
		{
			// The attempt through a is abandoned, not failed, so it is not
			// reported against a.
			name: "first drops packets", dialA: dialHang, dialB: dialOK, wantOK: true, wantVia: "b",
			minTime: 100 * time.Millisecond, maxTime: 600 * time.Millisecond,
			wantDials: []string{"a " + echo, "b " + echo}, wantReports: []string{"b ok"},
		},
		{
			name: "first fails at once", dialA: dialFail, dialB: dialOK, wantOK: true, wantVia: "b",
			maxTime: 90 * time.Millisecond, wantDials: []string{"a " + echo, "b " + echo}, wantReports: []string{"a failed", "b ok"},
		},
		{
			name: "both fail", dialA: dialFail, dialB: dialRefuse,
			maxTime: 90 * time.Millisecond, wantDials: []string{"a " + echo, "b " + echo}, wantReports: []string{"a failed", "b failed"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			network.setDial("a", tt.dialA)
			network.setDial("b", tt.dialB)
			p := testPolicyWith(t, raceRules)
			s, addr := startServer(t, Config{Network: network, DialTimeout: 2 * time.Second}, p.Listeners[0])
			c := dialProxy(t, addr)

			start := time.Now()
			c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, echo)))
			readExactly(t, c, 2)
			if !tt.wantOK {
				// The reply follows the first access point's failure.
				if got := readExactly(t, c, 10); got[1] != replyHostUnreachable {
					t.Errorf("reply code %d, want %d (host unreachable, from a)", got[1], replyHostUnreachable)
				}
			} else {
				readSuccess(t, c)
			}
			took := time.Since(start)
			if took < tt.minTime || took > tt.maxTime {
				t.Errorf("reply after %v, want between %v and %v", took, tt.minTime, tt.maxTime)
			}

			if tt.wantOK {
				conns := s.Conns()
				if len(conns) != 1 || conns[0].AccessPoint != tt.wantVia || conns[0].Destination != "internet" {
					t.Errorf("connection table %+v, want one row through %s of internet", conns, tt.wantVia)
				}
				exchange(t, c, []byte("raced"))
			}
			if got := network.dials(); !slices.Equal(got, tt.wantDials) {
				t.Errorf("dials %q, want %q", got, tt.wantDials)
			}
			waitFor(t, "dial reports", func() bool { return len(network.dialReports()) >= len(tt.wantReports) })
			if got := network.dialReports(); !slices.Equal(got, tt.wantReports) {
				t.Errorf("dial reports %q, want %q", got, tt.wantReports)
			}
		})
	}
}

func TestHTTPRace(t *testing.T) {
	tests := []struct {
		name    string
		connect bool
	}{
		{name: "get"},
		{name: "connect", connect: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bed := newHTTPTestBedWith(t, testPolicyWith(t, raceRules), httpListenerApp, Config{DialTimeout: 2 * time.Second})
			bed.network.setDial("a", dialHang)

			start := time.Now()
			var body string
			if tt.connect {
				body = connectGet(t, bed.proxy, bed.originTarget(), "/raced")
			} else {
				body = getBody(t, proxyClient(t, "http://"+bed.proxy), bed.originURL("/raced"))
			}
			if took := time.Since(start); took > 600*time.Millisecond {
				t.Errorf("response after %v, want within the race delay and a round trip", took)
			}
			if body != "origin saw /raced" {
				t.Errorf("body %q, want %q", body, "origin saw /raced")
			}
			seen := bed.origin.requests()
			if len(seen) != 1 || seen[0].source != httpSources["b"] {
				t.Errorf("origin saw %+v, want one request from b (%s)", seen, httpSources["b"])
			}
		})
	}
}

// connectGet opens a CONNECT tunnel to target through the HTTP proxy at
// proxyAddr and sends GET path over it, returning the response body.
func connectGet(t *testing.T, proxyAddr, target, path string) string {
	t.Helper()
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		t.Fatalf("dialling proxy: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("reading CONNECT response: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT status %d, want 200", resp.StatusCode)
	}
	io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: "+target+"\r\nConnection: close\r\n\r\n")
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading response through the tunnel: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}

func TestSOCKS5RoundRobin(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	network := newFakeNetwork(t)
	p := testPolicyWith(t, "    select: round-robin\n")
	_, addr := startServer(t, Config{Network: network}, p.Listeners[0])

	for range 4 {
		c := dialProxy(t, addr)
		c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, echo)))
		readExactly(t, c, 2)
		readSuccess(t, c)
		exchange(t, c, []byte("spread"))
	}
	want := []string{"a " + echo, "b " + echo, "a " + echo, "b " + echo}
	if got := network.dials(); !slices.Equal(got, want) {
		t.Errorf("dials %q, want %q", got, want)
	}
}

func TestCloseConns(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	network := newFakeNetwork(t)
	p := testPolicy(t)
	s, addr := startServer(t, Config{Network: network}, p.Listeners[0])
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln, p.Listeners[5]) }()
	t.Cleanup(func() { s.Close(); <-served })
	mailAddr := ln.Addr().String()

	// web goes through a of internet, mail through b of its own
	// destination b.
	open := func(proxyAddr string) *net.TCPConn {
		c := dialProxy(t, proxyAddr)
		c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, echo)))
		readExactly(t, c, 2)
		readSuccess(t, c)
		return c
	}
	web := open(addr)
	mail := open(mailAddr)

	n := s.CloseConns(func(c ConnInfo) bool { return c.Destination == "internet" && c.AccessPoint == "a" })
	if n != 1 {
		t.Errorf("CloseConns closed %d connections, want 1", n)
	}
	expectClosed(t, web)

	// The connection of the other destination is untouched.
	mail.Write([]byte("still open"))
	mail.CloseWrite()
	mail.SetDeadline(time.Now().Add(2 * time.Second))
	got, err := io.ReadAll(mail)
	if err != nil || !strings.HasSuffix(string(got), "echo:still open") {
		t.Errorf("mail connection read %q, %v, want its echo", got, err)
	}
}
