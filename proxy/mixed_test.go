package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestMixedListener(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer web.Close()
	webAddr := web.Listener.Addr().String()

	tests := []struct {
		name  string
		send  []byte
		check func(t *testing.T, c io.Reader)
	}{
		{
			name: "socks5",
			send: append(greeting(methodNoAuth), request(t, 1, echo)...),
			check: func(t *testing.T, c io.Reader) {
				if got := readExactly(t, c, 2); !bytes.Equal(got, []byte{5, methodNoAuth}) {
					t.Fatalf("method selection % x, want 05 00", got)
				}
				readSuccess(t, c)
			},
		},
		{
			name: "socks4 rejected",
			send: []byte{4, 1, 0, 80, 127, 0, 0, 1, 0},
			check: func(t *testing.T, c io.Reader) {
				if got, want := readExactly(t, c, 8), []byte{0x00, 0x5B, 0, 0, 0, 0, 0, 0}; !bytes.Equal(got, want) {
					t.Errorf("reply % x, want % x", got, want)
				}
			},
		},
		{
			name: "http",
			send: []byte("GET http://" + webAddr + "/ HTTP/1.1\r\nHost: " + webAddr + "\r\nConnection: close\r\n\r\n"),
			check: func(t *testing.T, c io.Reader) {
				// Whatever the HTTP front end replies, it replies in HTTP.
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil || !strings.HasPrefix(line, "HTTP/1.1 ") {
					t.Errorf("first line %q, %v, want an HTTP/1.1 status line", line, err)
				}
			},
		},
		{name: "tls client hello", send: []byte{0x16, 0x03, 0x01, 0x00, 0x05}},
		{name: "nothing sent"}, // closed when the handshake deadline passes
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			network := newFakeNetwork(t)
			p := testPolicy(t)
			_, addr := startServer(t, Config{Network: network, HandshakeTimeout: 300 * time.Millisecond}, p.Listeners[2])
			c := dialProxy(t, addr)

			start := time.Now()
			if tt.send != nil {
				c.Write(tt.send)
			}
			if tt.check != nil {
				tt.check(t, c)
				return
			}
			expectClosed(t, c)
			if tt.send == nil {
				if took := time.Since(start); took < 250*time.Millisecond || took > 3*time.Second {
					t.Errorf("closed after %v, want about 300ms", took)
				}
			}
			if got := network.dials(); len(got) > 0 {
				t.Errorf("dials %q, want none", got)
			}
		})
	}
}

func TestSOCKS5HandshakeDeadline(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	network := newFakeNetwork(t)
	p := testPolicy(t)
	_, addr := startServer(t, Config{Network: network, HandshakeTimeout: 200 * time.Millisecond}, p.Listeners[0])

	t.Run("stalled greeting", func(t *testing.T) {
		c := dialProxy(t, addr)
		c.Write([]byte{5, 1}) // the method list never comes
		start := time.Now()
		expectClosed(t, c)
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("closed after %v, want about 200ms", took)
		}
	})

	t.Run("tunnel outlives deadline", func(t *testing.T) {
		c := openTunnel(t, addr, echo)
		time.Sleep(400 * time.Millisecond)
		exchange(t, c, []byte("still open"))
	})
}
