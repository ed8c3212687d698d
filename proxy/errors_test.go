package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"iapd/policy"
)

func TestDialErrorText(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	noAP := fmt.Errorf("destination %q: %w (a: link down)", "internet", policy.ErrNoUsableAccessPoint)

	tests := []struct {
		name        string
		err         *DialError
		want        string
		wantFailure failure
	}{
		{
			name:        "no usable access point",
			err:         &DialError{Op: "select", App: "web", Destination: "internet", Target: "web.test:80", Err: noAP},
			want:        `choosing an access point to reach web.test:80 for app "web": network is unreachable: destination "internet": policy: no usable access point (a: link down)`,
			wantFailure: failureNetworkUnreachable,
		},
		{
			name:        "refused",
			err:         &DialError{Op: "connect", App: "web", AccessPoint: "a", Interface: "eth-a", Target: "127.0.0.1:1", Err: refused},
			want:        `connecting to 127.0.0.1:1 for app "web" through access point "a" (eth-a): dial tcp 127.0.0.1:1: connect: connection refused`,
			wantFailure: failureConnectionRefused,
		},
		{
			name:        "name not found",
			err:         &DialError{Op: "resolve", App: "web", AccessPoint: "b", Interface: "eth-b", Target: "missing.test:80", Err: &net.DNSError{Err: "no such host", Name: "missing.test", IsNotFound: true}},
			want:        `resolving missing.test:80 for app "web" through access point "b" (eth-b): lookup missing.test: no such host`,
			wantFailure: failureHostUnreachable,
		},
		{
			name:        "timeout",
			err:         &DialError{Op: "connect", AccessPoint: "a", Target: "127.0.0.1:1", Err: context.DeadlineExceeded},
			want:        `connecting to 127.0.0.1:1 through access point "a": context deadline exceeded`,
			wantFailure: failureHostUnreachable,
		},
		{
			name:        "kernel network unreachable",
			err:         &DialError{Op: "connect", AccessPoint: "a", Target: "192.0.2.1:80", Err: os.NewSyscallError("connect", syscall.ENETUNREACH)},
			want:        `connecting to 192.0.2.1:80 through access point "a": connect: network is unreachable`,
			wantFailure: failureNetworkUnreachable,
		},
		{
			name:        "host unreachable",
			err:         &DialError{Op: "connect", AccessPoint: "a", Target: "192.0.2.1:80", Err: os.NewSyscallError("connect", syscall.EHOSTUNREACH)},
			want:        `connecting to 192.0.2.1:80 through access point "a": connect: no route to host`,
			wantFailure: failureHostUnreachable,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("Error() = %q, want %q", got, tt.want)
			}
			if got := classify(tt.err); got != tt.wantFailure {
				t.Errorf("classify = %q, want %q", got, tt.wantFailure)
			}
			if !errors.Is(tt.err, tt.err.Err) {
				t.Errorf("errors.Is does not reach the cause")
			}
		})
	}
}

func TestSplitTarget(t *testing.T) {
	tests := []struct {
		name     string
		target   string
		wantHost string
		wantPort uint16
		wantErr  string
	}{
		{name: "name", target: "web.test:443", wantHost: "web.test", wantPort: 443},
		{name: "ipv6", target: "[::1]:80", wantHost: "::1", wantPort: 80},
		{name: "no port", target: "web.test", wantErr: "proxy: invalid target: address web.test: missing port in address"},
		{name: "port zero", target: "web.test:0", wantErr: `proxy: invalid target: "web.test:0" is not host:port with a port from 1 to 65535`},
		{name: "port too big", target: "web.test:65536", wantErr: `proxy: invalid target: "web.test:65536" is not host:port with a port from 1 to 65535`},
		{name: "no host", target: ":80", wantErr: `proxy: invalid target: ":80" is not host:port with a port from 1 to 65535`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, port, err := splitTarget(tt.target)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				if !errors.Is(err, ErrInvalidTarget) {
					t.Errorf("error does not wrap ErrInvalidTarget")
				}
				return
			}
			if err != nil || host != tt.wantHost || port != tt.wantPort {
				t.Errorf("splitTarget = %q, %d, %v, want %q, %d", host, port, err, tt.wantHost, tt.wantPort)
			}
		})
	}
}

func TestShareDeadline(t *testing.T) {
	tests := []struct {
		name      string
		remaining time.Duration // 0: no deadline
		left      int
		want      time.Duration // 0: no deadline
	}{
		{name: "no deadline", left: 2},
		{name: "last attempt keeps all", remaining: 4 * time.Second, left: 1, want: 4 * time.Second},
		{name: "even share", remaining: 4 * time.Second, left: 2, want: 2 * time.Second},
		{name: "at least the minimum", remaining: 3 * time.Second, left: 6, want: minAttemptTime},
		{name: "never past the deadline", remaining: 500 * time.Millisecond, left: 3, want: 500 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			if tt.remaining > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.remaining)
				defer cancel()
			}
			shared, cancel := shareDeadline(ctx, tt.left)
			defer cancel()

			deadline, ok := shared.Deadline()
			if tt.want == 0 {
				if ok {
					t.Errorf("deadline %v, want none", deadline)
				}
				return
			}
			if got := time.Until(deadline); got > tt.want || got < tt.want-100*time.Millisecond {
				t.Errorf("share %v, want about %v", got, tt.want)
			}
		})
	}
}

func TestDialAddressOrder(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	_, port, _ := net.SplitHostPort(echo)
	network := newFakeNetwork(t)
	p := testPolicy(t)
	s := NewServer(Config{Network: network, Logger: newTestLogger(t)})
	defer s.Close()

	// dual.test is ::1 first, where nothing listens on the port, then
	// 127.0.0.1, where the echo server does.
	up, err := s.dial(t.Context(), p.Apps["web"], "", p.Listeners[0], "dual.test:"+port)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer up.Close()
	want := []string{"a [::1]:" + port, "a 127.0.0.1:" + port}
	if got := network.dials(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("dials %q, want %q", got, want)
	}
	if got := up.RemoteAddr().String(); got != echo {
		t.Errorf("connected to %s, want %s", got, echo)
	}
}
