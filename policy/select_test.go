package policy

import (
	"slices"
	"testing"
	"time"
)

// selectPolicy has three access points on listed interfaces (ethernet cost
// 0, wifi cost 5, cellular cost 10 and metered) and one destination per
// selection rule over them, listed cell first.
func selectPolicy(t *testing.T) *Policy {
	t.Helper()
	setEnv(t, nil)
	p, err := Parse("select.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    app: any
apps:
  any: {destination: by-priority}
  unmetered: {destination: by-priority, require: {metered: false}}
  spread: {destination: by-turn}
  metered-only: {destination: by-priority, require: {metered: true}}
  wired-or-wifi: {destination: by-priority, require: {types: [ethernet, wifi]}}
  typed: {destination: untyped, require: {types: [vpn]}}
access_points:
  cell: {interface: wwan0, dns: [198.51.100.53]}
  wifi: {interface: wlan0, dns: [192.0.2.53]}
  eth: {interface: eth0, dns: [203.0.113.53]}
  other: {interface: eth9, dns: [203.0.113.53]}
interfaces:
  wwan0: {type: cellular, cost: 10}
  wlan0: {type: wifi, cost: 5}
  eth0: {type: ethernet}
destinations:
  by-priority: {access_points: [cell, wifi, eth], hold_down: 5s}
  by-cost: {access_points: [cell, wifi, eth], select: cost}
  by-latency: {access_points: [cell, wifi, eth], select: latency, tolerance: 10ms}
  by-turn: {access_points: [cell, wifi, eth], select: round-robin}
  by-race: {access_points: [cell, wifi, eth], select: race, race_delay: 100ms}
  untyped: {access_points: [other, eth]}
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return p
}

// statusesFor returns usable statuses with the policy's link facts and the
// given probe latencies, by access point name.
func statusesFor(p *Policy, latency map[string]time.Duration) map[string]Status {
	m := make(map[string]Status)
	for _, ap := range p.AccessPointOrder {
		m[ap.Name] = Status{Usable: true, IPv4: true, IPv6: true, Link: p.Link(ap.Interface), Latency: latency[ap.Name]}
	}
	return m
}

func TestPlanDestinationSelection(t *testing.T) {
	p := selectPolicy(t)
	ms := time.Millisecond
	tests := []struct {
		name        string
		destination string
		latency     map[string]time.Duration
		down        mapUsability
		current     string // access point in use for the latency rule
		turn        uint64
		want        []string
		wantWhy     string
	}{
		{name: "priority", destination: "by-priority", want: []string{"cell", "wifi", "eth"}, wantWhy: "first usable in the destination's order"},
		{name: "priority first down", destination: "by-priority", down: mapUsability{"cell": "interface wwan0 is down"}, want: []string{"wifi", "eth"}, wantWhy: "first usable in the destination's order"},
		{name: "cost", destination: "by-cost", want: []string{"eth", "wifi", "cell"}, wantWhy: "lowest cost (0)"},
		{name: "cost cheapest down", destination: "by-cost", down: mapUsability{"eth": "interface eth0 is down"}, want: []string{"wifi", "cell"}, wantWhy: "lowest cost (5)"},
		{
			name: "latency lowest first", destination: "by-latency",
			latency: map[string]time.Duration{"cell": 80 * ms, "wifi": 30 * ms, "eth": 12 * ms},
			want:    []string{"eth", "wifi", "cell"}, wantWhy: "lowest probe latency (12ms)",
		},
		{
			name: "latency unmeasured last", destination: "by-latency",
			latency: map[string]time.Duration{"wifi": 30 * ms},
			want:    []string{"wifi", "cell", "eth"}, wantWhy: "lowest probe latency (30ms)",
		},
		{
			name: "latency none measured", destination: "by-latency",
			want: []string{"cell", "wifi", "eth"}, wantWhy: "no latency measured yet, so the destination's order",
		},
		{
			name: "latency within tolerance keeps current", destination: "by-latency",
			latency: map[string]time.Duration{"cell": 80 * ms, "wifi": 20 * ms, "eth": 15 * ms}, current: "wifi",
			want: []string{"wifi", "eth", "cell"}, wantWhy: "probe latency 20ms, within the tolerance of 10ms of the lowest (15ms)",
		},
		{
			name: "latency beyond tolerance leaves current", destination: "by-latency",
			latency: map[string]time.Duration{"cell": 80 * ms, "wifi": 30 * ms, "eth": 15 * ms}, current: "wifi",
			want: []string{"eth", "wifi", "cell"}, wantWhy: "lowest probe latency (15ms)",
		},
		{
			name: "latency ties go to destination order", destination: "by-latency",
			latency: map[string]time.Duration{"cell": 14 * ms, "wifi": 30 * ms, "eth": 12 * ms},
			want:    []string{"cell", "eth", "wifi"}, wantWhy: "probe latency 14ms, within the tolerance of 10ms of the lowest (12ms)",
		},
		// A destination's own plan takes no turn: it starts at the first.
		{name: "round-robin without a turn", destination: "by-turn", turn: 4, want: []string{"cell", "wifi", "eth"}, wantWhy: "round-robin: its turn among 3 usable access points"},
		{name: "race", destination: "by-race", want: []string{"cell", "wifi", "eth"}, wantWhy: "race: dialled first, the next starts after 100ms"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &fakeConditions{down: tt.down, status: statusesFor(p, tt.latency), turn: tt.turn}
			if tt.current != "" {
				c.current = map[string]*AccessPoint{tt.destination: p.AccessPoints[tt.current]}
			}
			plan := PlanDestination(p.Destinations[tt.destination], c)
			if got := names(plan.Candidates); !slices.Equal(got, tt.want) {
				t.Errorf("candidates = %v, want %v", got, tt.want)
			}
			if plan.Why != tt.wantWhy {
				t.Errorf("why = %q, want %q", plan.Why, tt.wantWhy)
			}
			if plan.App != nil {
				t.Errorf("plan of a destination has app %q", plan.App.Name)
			}
		})
	}
}

func TestNewPlanRoundRobin(t *testing.T) {
	p := selectPolicy(t)
	tests := []struct {
		name string
		down mapUsability
		want []string // first candidate of each new connection
	}{
		{name: "all usable", want: []string{"cell", "wifi", "eth", "cell"}},
		{name: "skips unusable", down: mapUsability{"cell": "interface wwan0 is down"}, want: []string{"wifi", "eth", "wifi", "eth"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &fakeConditions{down: tt.down, status: statusesFor(p, nil)}
			var got []string
			for range tt.want {
				plan := NewPlan(p.Apps["spread"], "example.com:443", c)
				got = append(got, plan.Candidates[0].Name)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("first candidates = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestPlanHoldDown(t *testing.T) {
	p := selectPolicy(t)
	now := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name     string
		since    map[string]time.Time // when an access point came back
		down     mapUsability
		want     []string
		wantHeld []string
		wantWhy  string
	}{
		{name: "usable since start", want: []string{"cell", "wifi", "eth"}, wantWhy: "first usable in the destination's order"},
		{
			name:  "returned within hold-down goes last",
			since: map[string]time.Time{"cell": now.Add(-2 * time.Second)},
			want:  []string{"wifi", "eth", "cell"}, wantHeld: []string{"cell"},
			wantWhy: "first usable in the destination's order",
		},
		{
			name:    "returned after hold-down goes first",
			since:   map[string]time.Time{"cell": now.Add(-5 * time.Second)},
			want:    []string{"cell", "wifi", "eth"},
			wantWhy: "first usable in the destination's order",
		},
		{
			name:  "held used when nothing else is usable",
			since: map[string]time.Time{"cell": now.Add(-1500 * time.Millisecond)},
			down:  mapUsability{"wifi": "interface wlan0 is down", "eth": "interface eth0 is down"},
			want:  []string{"cell"}, wantHeld: []string{"cell"},
			wantWhy: "first usable in the destination's order; it came back 1.5s ago and is held down for 5s, but nothing else is usable",
		},
		{
			name:  "two held keep their order",
			since: map[string]time.Time{"cell": now.Add(-time.Second), "wifi": now.Add(-3 * time.Second)},
			want:  []string{"eth", "cell", "wifi"}, wantHeld: []string{"cell", "wifi"},
			wantWhy: "first usable in the destination's order",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status := statusesFor(p, nil)
			for name, since := range tt.since {
				st := status[name]
				st.Since = since
				status[name] = st
			}
			plan := PlanDestination(p.Destinations["by-priority"], &fakeConditions{down: tt.down, status: status, now: now})
			if got := names(plan.Candidates); !slices.Equal(got, tt.want) {
				t.Errorf("candidates = %v, want %v", got, tt.want)
			}
			var held []string
			for _, h := range plan.Held {
				held = append(held, h.AccessPoint.Name)
				if want := tt.since[h.AccessPoint.Name].Add(5 * time.Second); !h.Until.Equal(want) {
					t.Errorf("%s held until %v, want %v", h.AccessPoint.Name, h.Until, want)
				}
			}
			if !slices.Equal(held, tt.wantHeld) {
				t.Errorf("held = %v, want %v", held, tt.wantHeld)
			}
			if plan.Why != tt.wantWhy {
				t.Errorf("why = %q, want %q", plan.Why, tt.wantWhy)
			}
		})
	}
}

func TestNewPlanRequirements(t *testing.T) {
	p := selectPolicy(t)
	tests := []struct {
		name         string
		app          string
		target       string
		status       func(map[string]Status)
		down         mapUsability
		want         []string
		wantFiltered []string
		wantErr      string
	}{
		{name: "no requirement", app: "any", target: "example.com:443", want: []string{"cell", "wifi", "eth"}},
		{
			name: "unmetered leaves out cellular", app: "unmetered", target: "example.com:443",
			want:         []string{"wifi", "eth"},
			wantFiltered: []string{"cell: interface wwan0 is metered, and the app requires unmetered"},
		},
		{
			name: "unmetered refused when only cellular is usable", app: "unmetered", target: "example.com:443",
			down:         mapUsability{"wifi": "interface wlan0 is down", "eth": "interface eth0 is down"},
			wantFiltered: []string{"cell: interface wwan0 is metered, and the app requires unmetered"},
			wantErr:      `destination "by-priority": policy: no usable access point (cell: interface wwan0 is metered, and the app requires unmetered; wifi: interface wlan0 is down; eth: interface eth0 is down)`,
		},
		{
			name: "metered only", app: "metered-only", target: "example.com:443",
			want: []string{"cell"},
			wantFiltered: []string{
				"wifi: interface wlan0 is unmetered, and the app requires metered",
				"eth: interface eth0 is unmetered, and the app requires metered",
			},
		},
		{
			name: "types", app: "wired-or-wifi", target: "example.com:443",
			want:         []string{"wifi", "eth"},
			wantFiltered: []string{"cell: interface wwan0 is cellular, and the app requires ethernet or wifi"},
		},
		{
			name: "interface without type", app: "typed", target: "example.com:443",
			wantFiltered: []string{
				"other: interface eth9 has no type, and the app requires vpn (set interfaces.eth9.type)",
				"eth: interface eth0 is ethernet, and the app requires vpn",
			},
			wantErr: `destination "untyped": policy: no usable access point (other: interface eth9 has no type, and the app requires vpn (set interfaces.eth9.type); eth: interface eth0 is ethernet, and the app requires vpn)`,
		},
		{
			name: "IPv6 target skips IPv4-only", app: "any", target: "[2001:db8::1]:443",
			status:       func(m map[string]Status) { st := m["cell"]; st.IPv6 = false; m["cell"] = st },
			want:         []string{"wifi", "eth"},
			wantFiltered: []string{"cell: interface wwan0 has no IPv6 address and route, and the target is an IPv6 address"},
		},
		{
			name: "IPv4 target skips IPv6-only", app: "any", target: "192.0.2.10:80",
			status:       func(m map[string]Status) { st := m["wifi"]; st.IPv4 = false; m["wifi"] = st },
			want:         []string{"cell", "eth"},
			wantFiltered: []string{"wifi: interface wlan0 has no IPv4 address and route, and the target is an IPv4 address"},
		},
		{
			name: "name target takes either family", app: "any", target: "example.com:443",
			status: func(m map[string]Status) { st := m["wifi"]; st.IPv4 = false; m["wifi"] = st },
			want:   []string{"cell", "wifi", "eth"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status := statusesFor(p, nil)
			if tt.status != nil {
				tt.status(status)
			}
			plan := NewPlan(p.Apps[tt.app], tt.target, &fakeConditions{down: tt.down, status: status})
			if got := names(plan.Candidates); !slices.Equal(got, tt.want) {
				t.Errorf("candidates = %v, want %v", got, tt.want)
			}
			var filtered []string
			for _, u := range plan.Unusable {
				if u.Filtered {
					filtered = append(filtered, u.AccessPoint.Name+": "+u.Reason)
				}
			}
			if !slices.Equal(filtered, tt.wantFiltered) {
				t.Errorf("filtered = %q, want %q", filtered, tt.wantFiltered)
			}
			err := plan.Err()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Err() = %v, want nil", err)
			case tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr):
				t.Errorf("Err() = %v\nwant %s", err, tt.wantErr)
			}
		})
	}
}

func TestPolicyLink(t *testing.T) {
	p := selectPolicy(t)
	tests := []struct {
		name string
		want Link
	}{
		{name: "wwan0", want: Link{Interface: "wwan0", Type: LinkCellular, Cost: 10, Metered: true}},
		{name: "wlan0", want: Link{Interface: "wlan0", Type: LinkWifi, Cost: 5}},
		{name: "eth0", want: Link{Interface: "eth0", Type: LinkEthernet}},
		{name: "eth9", want: Link{Interface: "eth9"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := p.Link(tt.name); got != tt.want {
				t.Errorf("Link(%q) = %+v, want %+v", tt.name, got, tt.want)
			}
		})
	}
}
