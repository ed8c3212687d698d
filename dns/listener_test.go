package dns

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	dnsmsg "github.com/miekg/dns"
)

// askListener sends one A query for name to the listener at addr over
// network and returns the reply as "RCODE" or "RCODE address".
func askListener(t *testing.T, network, addr, name string) (string, error) {
	t.Helper()
	c := &dnsmsg.Client{Net: network, Timeout: 2 * time.Second}
	resp, _, err := c.Exchange(new(dnsmsg.Msg).SetQuestion(name, dnsmsg.TypeA), addr)
	if err != nil {
		return "", err
	}
	out := dnsmsg.RcodeToString[resp.Rcode]
	for _, rr := range resp.Answer {
		if a, ok := rr.(*dnsmsg.A); ok {
			out += " " + a.A.String()
		}
	}
	return out, nil
}

func TestListenerUpdate(t *testing.T) {
	wifi := startServer(t, "127.0.0.1", newZone(t, "www.example.test. 60 IN A 192.0.2.1").handler())
	cell := startServer(t, "127.0.0.1", newZone(t, "www.example.test. 60 IN A 198.51.100.1").handler())
	wifiResolver, _ := newTestResolver(t, Config{Name: "wifi"}, wifi)
	cellResolver, _ := newTestResolver(t, Config{Name: "cell"}, cell)
	through := func(r *Resolver, name string) func(string) ([]*Resolver, []string, error) {
		return func(string) ([]*Resolver, []string, error) { return []*Resolver{r}, []string{name}, nil }
	}

	pc, ln := listenSamePort(t, "127.0.0.1")
	addr := pc.LocalAddr().String()
	l := NewListener(ListenerConfig{App: "browser", Route: through(wifiResolver, "wifi"), Logger: testLogger(t)})
	l.Serve(pc, ln)
	closed := false
	t.Cleanup(func() {
		if !closed {
			l.Close()
		}
	})

	steps := []struct {
		name   string
		update *ListenerConfig // applied before the queries; nil keeps the configuration
		want   string
		// wantStats counts every step so far, since Update keeps the
		// counters.
		wantStats ListenerStats
	}{
		{name: "first app", want: "NOERROR 192.0.2.1", wantStats: ListenerStats{Queries: 2}},
		{
			name:      "other app after update",
			update:    &ListenerConfig{App: "mail", Route: through(cellResolver, "cell"), Logger: testLogger(t)},
			want:      "NOERROR 198.51.100.1",
			wantStats: ListenerStats{Queries: 4},
		},
		{
			name: "refused after update",
			update: &ListenerConfig{App: "mail", Logger: testLogger(t), Route: func(string) ([]*Resolver, []string, error) {
				return nil, nil, fmt.Errorf("%w: rejected by route", ErrRefused)
			}},
			want:      "REFUSED",
			wantStats: ListenerStats{Queries: 6, Refused: 2},
		},
		{
			name: "no usable access point",
			update: &ListenerConfig{App: "mail", Logger: testLogger(t), Route: func(string) ([]*Resolver, []string, error) {
				return nil, nil, nil
			}},
			want:      "SERVFAIL",
			wantStats: ListenerStats{Queries: 8, Refused: 2, Failed: 2},
		},
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			if step.update != nil {
				l.Update(*step.update)
			}
			for _, network := range []string{"udp", "tcp"} {
				got, err := askListener(t, network, addr, "www.example.test.")
				if err != nil {
					t.Fatalf("query over %s: %v", network, err)
				}
				if got != step.want {
					t.Errorf("reply over %s = %q, want %q", network, got, step.want)
				}
			}
			if got := l.Stats(); got != step.wantStats {
				t.Errorf("Stats() = %+v, want %+v", got, step.wantStats)
			}
		})
	}

	// Close releases both sockets, so the port can be bound again.
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	closed = true
	if _, err := askListener(t, "tcp", addr, "www.example.test."); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("query over tcp after Close: %v, want connection refused", err)
	}
	if c, err := net.ListenPacket("udp", addr); err != nil {
		t.Errorf("binding udp %s after Close: %v", addr, err)
	} else {
		c.Close()
	}
	if c, err := net.Listen("tcp", addr); err != nil {
		t.Errorf("binding tcp %s after Close: %v", addr, err)
	} else {
		c.Close()
	}
}
