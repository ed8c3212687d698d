package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// peerKind is another SOCKS5 proxy that the relay measures can run beside
// iapd, so that the table shows what an established proxy reaches on the
// same machine in the same run. Peers serve SOCKS5 without
// authentication, like iapd's socks5 column.
type peerKind struct {
	name    string // column of the table
	program string // looked up in PATH, then in /usr/sbin
	pkg     string // Debian package that installs program
	self    bool   // the benchmark's own binary serves it (program and pkg are empty)
	// args returns the command line that serves SOCKS5 on addr, writing
	// any file it needs into dir.
	args func(addr netip.AddrPort, dir string) ([]string, error)
}

// peerKinds are the peers iapdbench supports, in table order: the minimal
// proxy in Go of runMinimalProxy, microsocks, a small proxy in C with a
// thread per connection, and Dante, a full SOCKS server in C with pools of
// processes.
var peerKinds = []peerKind{
	{name: "go-minimal", self: true, args: func(netip.AddrPort, string) ([]string, error) { return nil, nil }},
	{name: "microsocks", program: "microsocks", pkg: "microsocks", args: microsocksArgs},
	{name: "dante", program: "danted", pkg: "dante-server", args: danteArgs},
}

func microsocksArgs(addr netip.AddrPort, _ string) ([]string, error) {
	return []string{"-i", addr.Addr().String(), "-p", fmt.Sprint(addr.Port())}, nil
}

// danteConfig lets loopback clients reach loopback targets without
// authentication and logs only to stderr, which the benchmark keeps for
// error messages. The user lines apply when the benchmark runs as root,
// so that Dante switches to the user nobody where it can.
const danteConfig = `# Written by iapdbench; removed when the run ends.
logoutput: stderr
internal: %[1]s port = %[2]d
external: %[1]s
clientmethod: none
socksmethod: none
%[3]sclient pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }
socks pass { from: 127.0.0.0/8 to: 127.0.0.0/8 }
`

func danteArgs(addr netip.AddrPort, dir string) ([]string, error) {
	users := ""
	if os.Geteuid() == 0 {
		users = "user.privileged: root\nuser.unprivileged: nobody\n"
	}
	conf := filepath.Join(dir, fmt.Sprintf("danted-%d.conf", addr.Port()))
	text := fmt.Sprintf(danteConfig, addr.Addr(), addr.Port(), users)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		return nil, fmt.Errorf("writing Dante's configuration: %w", err)
	}
	pidFile := filepath.Join(dir, fmt.Sprintf("danted-%d.pid", addr.Port()))
	return []string{"-f", conf, "-p", pidFile}, nil
}

// peer is one running peer proxy.
type peer struct {
	kind   peerKind
	addr   netip.AddrPort
	cmd    *exec.Cmd
	stderr *tailBuffer
	exited chan struct{}
	failed bool // a relay measure failed; the peer is left out of the rest
}

// fail records that a relay measure of the peer failed, with its output in
// the progress log, and leaves the peer out of the rest of the relay
// measures: a peer that fails costs its own figures, not iapd's.
func (p *peer) fail(res *results, progress func(string, ...any), err error) {
	p.failed = true
	progress("peer %s failed: %v; its output:\n%s", p.kind.name, err, p.stderr.String())
	res.note("peer %s: %v; its later relay figures are missing", p.kind.name, err)
}

// findPeers resolves the -peers list: "auto" takes every known peer whose
// program is installed and notes the others, "none" takes none, and a
// list of names takes those, all of which must be installed.
func findPeers(list string) (kinds []peerKind, notes []string, err error) {
	if list == "none" || list == "" {
		return nil, nil, nil
	}
	if err := checkPeerList(list); err != nil {
		return nil, nil, err
	}
	auto := list == "auto"

	for _, k := range peerKinds {
		if !auto && !listHas(list, k.name) {
			continue
		}
		if _, err := k.path(); err != nil {
			if auto {
				notes = append(notes, fmt.Sprintf("peer %s not measured: %s is not installed (Debian package %s)", k.name, k.program, k.pkg))
				continue
			}
			return nil, nil, fmt.Errorf("peer %s: %w (install the Debian package %s)", k.name, err, k.pkg)
		}
		kinds = append(kinds, k)
	}
	return kinds, notes, nil
}

// checkPeerList returns an error unless list is "auto", "none", or a
// comma-separated list of known peers, each named once.
func checkPeerList(list string) error {
	if list == "auto" || list == "none" || list == "" {
		return nil
	}
	seen := map[string]bool{}
	for item := range strings.SplitSeq(list, ",") {
		name := strings.TrimSpace(item)
		switch {
		case !knownPeer(name):
			return fmt.Errorf("unknown peer %q: use auto, none or a list of %s", name, strings.Join(peerNames(), ", "))
		case seen[name]:
			return fmt.Errorf("peer %q named twice", name)
		}
		seen[name] = true
	}
	return nil
}

func listHas(list, name string) bool {
	for item := range strings.SplitSeq(list, ",") {
		if strings.TrimSpace(item) == name {
			return true
		}
	}
	return false
}

func knownPeer(name string) bool {
	for _, k := range peerKinds {
		if k.name == strings.TrimSpace(name) {
			return true
		}
	}
	return false
}

func peerNames() []string {
	names := make([]string, len(peerKinds))
	for i, k := range peerKinds {
		names[i] = k.name
	}
	return names
}

// path finds the peer's program; Debian installs danted in /usr/sbin,
// which a non-root PATH often lacks.
func (k peerKind) path() (string, error) {
	if k.self {
		return os.Executable()
	}
	if p, err := exec.LookPath(k.program); err == nil {
		return p, nil
	}
	p := filepath.Join("/usr/sbin", k.program)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not found in PATH or /usr/sbin", k.program)
	}
	return p, nil
}

// startPeer starts a peer on a free loopback port and waits until it
// accepts connections.
func startPeer(ctx context.Context, k peerKind, dir string) (*peer, error) {
	path, err := k.path()
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	args, err := k.args(ports[0], dir)
	if err != nil {
		return nil, err
	}

	p := &peer{kind: k, addr: ports[0], stderr: newTailBuffer(16 << 10), exited: make(chan struct{})}
	p.cmd = exec.Command(path, args...)
	if k.self {
		p.cmd.Env = append(os.Environ(), minimalProxyEnv+"="+p.addr.String())
	}
	p.cmd.Stdout = p.stderr
	p.cmd.Stderr = p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting peer %s: %w", k.name, err)
	}
	go func() {
		p.cmd.Wait()
		close(p.exited)
	}()

	if err := p.waitListening(ctx); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

// startPeers starts the peers that list names and records a note for
// each one that auto skips.
func startPeers(ctx context.Context, list, dir string, res *results, progress func(string, ...any)) ([]*peer, error) {
	kinds, notes, err := findPeers(list)
	if err != nil {
		return nil, err
	}
	for _, n := range notes {
		res.note("%s", n)
		progress("%s", n)
	}

	var peers []*peer
	for _, k := range kinds {
		p, err := startPeer(ctx, k, dir)
		if err != nil {
			for _, started := range peers {
				started.stop()
			}
			return nil, err
		}
		progress("started peer %s on %s", k.name, p.addr)
		peers = append(peers, p)
	}
	return peers, nil
}

// waitListening connects to the peer until it accepts, for at most
// readyTimeout.
func (p *peer) waitListening(ctx context.Context) error {
	deadline := time.Now().Add(readyTimeout)
	for {
		conn, err := net.DialTimeout("tcp", p.addr.String(), time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("peer %s exited before it listened on %s; its output:\n%s", p.kind.name, p.addr, p.stderr.String())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("peer %s did not listen on %s within %s; its output:\n%s", p.kind.name, p.addr, readyTimeout, p.stderr.String())
		}
	}
}

// mode returns the relay mode that reaches the sinks through the peer.
func (p *peer) mode() mode {
	return mode{Name: p.kind.name, kind: kindSOCKS5, peer: p}
}

// cpu returns the CPU time of the peer and all its processes.
func (p *peer) cpu() (time.Duration, error) {
	return treeCPU(p.cmd.Process.Pid)
}

// stop ends the peer's process group: Dante's children with it.
func (p *peer) stop() {
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(stopTimeout):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
}
