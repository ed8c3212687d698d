package main

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestFindPeers(t *testing.T) {
	tests := []struct {
		name    string
		list    string
		want    []string
		wantErr string
	}{
		{name: "none", list: "none"},
		{name: "empty", list: ""},
		{name: "unknown name", list: "microsocks,squid", wantErr: `unknown peer "squid": use auto, none or a list of go-minimal, microsocks, dante`},
		{name: "none in a list", list: "none,microsocks", wantErr: `unknown peer "none": use auto, none or a list of go-minimal, microsocks, dante`},
		{name: "named twice", list: "go-minimal,go-minimal", wantErr: `peer "go-minimal" named twice`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kinds, notes, err := findPeers(tt.list)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("findPeers(%q) error = %v, want %q", tt.list, err, tt.wantErr)
				}
				return
			}
			if err != nil || len(kinds) != 0 || len(notes) != 0 {
				t.Fatalf("findPeers(%q) = %v, %v, %v; want nothing", tt.list, kinds, notes, err)
			}
		})
	}
}

// TestFindPeersAuto checks that auto takes the installed peers and notes
// the missing ones, one way or the other for each peer.
func TestFindPeersAuto(t *testing.T) {
	kinds, notes, err := findPeers("auto")
	if err != nil {
		t.Fatal(err)
	}
	if len(kinds)+len(notes) != len(peerKinds) {
		t.Fatalf("auto found %d peers and noted %d, want %d in all", len(kinds), len(notes), len(peerKinds))
	}
	for _, k := range kinds {
		if _, err := k.path(); err != nil {
			t.Errorf("auto took %s, which is not installed: %v", k.name, err)
		}
	}
	for _, n := range notes {
		if !strings.Contains(n, "is not installed") {
			t.Errorf("note %q does not say what is missing", n)
		}
	}
}

// TestReadTreeUsage runs a shell with two children and checks that the
// tree holds all three processes.
func TestReadTreeUsage(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 30 & sleep 30 & wait")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("pkill", "-P", strconv.Itoa(cmd.Process.Pid)).Run()
		cmd.Process.Kill()
		cmd.Wait()
	})

	var u treeUsage
	deadline := time.Now().Add(5 * time.Second)
	for {
		var err error
		if u, err = readTreeUsage(cmd.Process.Pid); err != nil {
			t.Fatal(err)
		}
		if u.processes == 3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if u.processes != 3 || u.threads < 3 || u.mem.RSS <= 0 || u.mem.PSS <= 0 {
		t.Fatalf("tree usage = %+v, want 3 processes with their threads and memory", u)
	}
	if _, err := treeCPU(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
}

// TestPeerSetup runs the setup workload through the minimal proxy and
// through microsocks, which the test setup installs.
func TestPeerSetup(t *testing.T) {
	env, err := newEnvironment(endsCopy)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(env.close)

	for _, name := range []string{"go-minimal", "microsocks"} {
		t.Run(name, func(t *testing.T) {
			kinds, _, err := findPeers(name)
			if err != nil {
				if os.Getenv("CI") == "true" {
					t.Fatalf("%s not installed, which make setup-test installs: %v", name, err)
				}
				t.Skipf("%s not installed (make setup-test installs it): %v", name, err)
			}
			p, err := startPeer(context.Background(), kinds[0], env.dir)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.stop)

			m := p.mode()
			cm, err := startCPUMeter(nil, m, env.sinkPID)
			if err != nil {
				t.Fatal(err)
			}
			sr := runSetup(context.Background(), clientFor(m, nil), env.sinks, 2, 200*time.Millisecond)
			if sr.errors > 0 || sr.conns == 0 {
				t.Fatalf("setup through %s: %d connections, %d errors (first: %v)", name, sr.conns, sr.errors, sr.firstErr)
			}
			if _, err := cm.stop(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
