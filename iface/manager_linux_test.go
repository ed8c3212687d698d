package iface

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"iapd/policy"
)

// replace sets *p to v until the test ends. Tests using it must not run in
// parallel.
func replace[T any](t *testing.T, p *T, v T) {
	t.Helper()
	old := *p
	*p = v
	t.Cleanup(func() { *p = old })
}

func fakeCapabilities(caps ...int) func(*unix.CapUserHeader, *unix.CapUserData) error {
	return func(hdr *unix.CapUserHeader, data *unix.CapUserData) error {
		// capget(2) fills two sets for version 3: data points at the first.
		sets := (*[2]unix.CapUserData)(unsafe.Pointer(data))
		for _, c := range caps {
			sets[c/32].Effective |= 1 << (c % 32)
		}
		return nil
	}
}

func TestCheckCapabilities(t *testing.T) {
	bound := testPolicy(
		&policy.AccessPoint{Name: "fallback", Interface: policy.DefaultInterface},
		&policy.AccessPoint{Name: "cell", Interface: "cell"},
	)
	onlyDefault := testPolicy(&policy.AccessPoint{Name: "fallback", Interface: policy.DefaultInterface})

	tests := []struct {
		name    string
		policy  *policy.Policy
		caps    []int
		wantErr string
	}{
		{
			name: "no capabilities", policy: bound,
			wantErr: `iface: access point "cell" (interface cell) needs CAP_NET_ADMIN to mark its sockets and install routing table 18101: run iapd as root or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)`,
		},
		{
			name: "missing CAP_NET_RAW", policy: bound, caps: []int{unix.CAP_NET_ADMIN},
			wantErr: `iface: access point "cell" (interface cell) needs CAP_NET_RAW to bind its sockets to the interface: run iapd as root or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)`,
		},
		{name: "both capabilities", policy: bound, caps: []int{unix.CAP_NET_ADMIN, unix.CAP_NET_RAW}},
		{name: "interface default needs none", policy: onlyDefault},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			replace(t, &capget, fakeCapabilities(tt.caps...))
			var bound []*policy.AccessPoint
			for _, ap := range tt.policy.AccessPointOrder {
				if !ap.IsDefault() {
					bound = append(bound, ap)
				}
			}
			err := checkCapabilities(tt.policy, bound, assignSlots(tt.policy, nil))
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("checkCapabilities: %v", err)
				}
				return
			}
			if err == nil || err.Error() != tt.wantErr {
				t.Fatalf("error = %v\nwant    %s", err, tt.wantErr)
			}
			if !errors.Is(err, ErrMissingCapability) {
				t.Error("error does not wrap ErrMissingCapability")
			}
		})
	}
}

// fakeRPFilter points procSysNet at a directory whose rp_filter settings
// are all for net.ipv4.conf.all and own for the interface cell.
func fakeRPFilter(t *testing.T, all, own string) {
	t.Helper()
	dir := t.TempDir()
	for name, value := range map[string]string{"all": all, "cell": own} {
		path := filepath.Join(dir, "ipv4/conf", name, "rp_filter")
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(value+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	replace(t, &procSysNet, dir)
}

func TestReversePathFilterWarning(t *testing.T) {
	tests := []struct {
		name     string
		all, own string
		want     string // the sysctl named in the warning; empty for none
	}{
		{name: "strict on interface", all: "0", own: "1", want: "net.ipv4.conf.cell.rp_filter"},
		{name: "strict on all", all: "1", own: "0", want: "net.ipv4.conf.all.rp_filter"},
		{name: "loose on all wins", all: "2", own: "1"},
		{name: "off", all: "0", own: "0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fakeRPFilter(t, tt.all, tt.own)

			logger, logs := newTestLogger(t)
			ap := &policy.AccessPoint{Name: "cell", Interface: "cell", Index: 1}
			k := &tableKeeper{logger: logger, bound: []*policy.AccessPoint{ap}, rpChecked: make(map[string]int)}
			s := newSnapshot([]Interface{{Index: 4, Name: "cell", Up: true}}, nil)
			k.checkReversePathFilterLocked(s)
			k.checkReversePathFilterLocked(s) // the same interface is checked once

			warnings := logs.matching("level=WARN", "strict reverse path filtering")
			if tt.want == "" {
				if len(warnings) != 0 {
					t.Errorf("warned %q, want no warning", warnings)
				}
				return
			}
			if len(warnings) != 1 {
				t.Fatalf("logged %d warnings, want 1: %q", len(warnings), warnings)
			}
			if got := logs.matching("sysctl="+tt.want, "interface=cell", "access_point=cell", `fix="set `+tt.want+`=2 (loose)"`); len(got) != 1 {
				t.Errorf("warning %q does not name sysctl %s with its fix", warnings[0], tt.want)
			}
		})
	}
}

func TestLooseFilterWarning(t *testing.T) {
	withDefault := newSnapshot([]Interface{{Index: 4, Name: "cell", Up: true}, {Index: 5, Name: "wlan0", Up: true}},
		[]defaultRoute{{IfIndex: 5, Gateway: netip.MustParseAddr("192.0.2.1")}})
	withoutDefault := newSnapshot([]Interface{{Index: 4, Name: "cell", Up: true}, {Index: 5, Name: "wlan0", Up: false}}, nil)
	tests := []struct {
		name      string
		all, own  string
		snapshots []*Snapshot
		want      int // warnings
	}{
		{name: "loose without default route", all: "2", own: "0", snapshots: []*Snapshot{withoutDefault, withoutDefault}, want: 1},
		{name: "warned again after a default route came and went", all: "0", own: "2", snapshots: []*Snapshot{withoutDefault, withDefault, withoutDefault}, want: 2},
		{name: "loose with default route", all: "2", own: "2", snapshots: []*Snapshot{withDefault}},
		{name: "off without default route", all: "0", own: "0", snapshots: []*Snapshot{withoutDefault}},
		{name: "strict is warned about elsewhere", all: "1", own: "0", snapshots: []*Snapshot{withoutDefault}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fakeRPFilter(t, tt.all, tt.own)

			logger, logs := newTestLogger(t)
			ap := &policy.AccessPoint{Name: "cell", Interface: "cell", Index: 1}
			k := &tableKeeper{logger: logger, bound: []*policy.AccessPoint{ap}, warned: make(map[string]bool)}
			for _, s := range tt.snapshots {
				k.checkLooseFilterLocked(s)
			}
			got := logs.matching("level=WARN", "loose reverse path filtering drops replies", "access_point=cell", "net.ipv4.conf.cell.rp_filter=0")
			if len(got) != tt.want {
				t.Errorf("logged %d warnings, want %d: %q", len(got), tt.want, got)
			}
		})
	}
}
