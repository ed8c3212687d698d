package iface

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"iapd/policy"
)

// maxProbeBody bounds how much of an http probe's response body is read
// before the connection is closed.
const maxProbeBody = 64 << 10

// errNoResolver means a probe names a host but Health was given no way to
// resolve it.
var errNoResolver = errors.New("no resolver for the probe's names")

// probePhase is the conclusion of an access point's probes so far.
type probePhase uint8

const (
	phaseUnknown probePhase = iota // no pass since start or since the link came back
	phaseUp                        // passing
	phaseDown                      // failed, or real dials failed, and not recovered yet
)

// probeState is the probe bookkeeping of one access point. Health guards
// it with its mutex.
type probeState struct {
	linkOK bool // interface state and routing tables let probes run

	phase   probePhase
	passes  int           // in a row
	fails   int           // in a row
	latency time.Duration // round trip of the last pass
	lastErr error         // of the last failure

	dialFailures int   // real dials in a row that failed
	dialErr      error // of the last failed dial
	downByDials  bool  // phaseDown because of dialFailures
}

// reset drops every result, as when the link goes away.
func (p *probeState) reset() { *p = probeState{linkOK: p.linkOK} }

// record counts one probe's result. The first pass after a reset makes
// the access point usable; after it went down it takes cfg.Successes
// passes in a row. cfg.Failures failures in a row take it down.
func (p *probeState) record(cfg *policy.Probe, rtt time.Duration, err error) {
	if err == nil {
		p.fails = 0
		p.passes++
		p.latency = rtt
		p.lastErr = nil
		switch {
		case p.phase == phaseUnknown:
			p.phase = phaseUp
		case p.phase == phaseDown && p.passes >= cfg.Successes:
			p.phase = phaseUp
			p.downByDials = false
			p.dialFailures = 0
		}
		return
	}

	p.passes = 0
	p.fails++
	p.lastErr = err
	if p.phase != phaseDown && p.fails >= cfg.Failures {
		p.phase = phaseDown
		p.downByDials = false
	}
}

// dialFailed counts a failed real dial and reports whether it took the
// access point down.
func (p *probeState) dialFailed(cfg *policy.Probe, err error) bool {
	p.dialFailures++
	p.dialErr = err
	if p.phase != phaseUp || p.dialFailures < cfg.DialFailures {
		return false
	}
	p.phase = phaseDown
	p.downByDials = true
	p.passes = 0
	return true
}

// usable returns whether the probe lets the access point carry traffic,
// and why not.
func (p *probeState) usable(cfg *policy.Probe) (bool, string) {
	switch p.phase {
	case phaseUp:
		return true, ""
	case phaseDown:
		if p.passes > 0 {
			return false, fmt.Sprintf("probe recovering: passed %d of the %d times in a row needed", p.passes, cfg.Successes)
		}
		if p.downByDials {
			return false, fmt.Sprintf("%d dials in a row failed: %v", cfg.DialFailures, p.dialErr)
		}
		return false, fmt.Sprintf("probe failed: %v", p.lastErr)
	}
	if p.lastErr != nil {
		return false, fmt.Sprintf("probe has not passed yet: %v", p.lastErr)
	}
	return false, "probe has not passed yet"
}

// latencyIfUp returns the last round trip while the probe passes, and
// zero otherwise.
func (p *probeState) latencyIfUp() time.Duration {
	if p.phase == phaseUp {
		return p.latency
	}
	return 0
}

// describe returns, for people, what the probe sends and what it found.
func (p *probeState) describe(cfg *policy.Probe) string {
	what := fmt.Sprintf("%s %s every %s", cfg.Kind, cfg.Target, cfg.Interval)
	switch {
	case !p.linkOK:
		return what + ": paused while the link is unusable"
	case p.phase == phaseUp:
		return fmt.Sprintf("%s: passed, %s", what, p.latency.Round(time.Microsecond))
	case p.phase == phaseDown && p.downByDials && p.passes == 0:
		return fmt.Sprintf("%s: down after %d failed dials: %v", what, cfg.DialFailures, p.dialErr)
	case p.passes > 0:
		return fmt.Sprintf("%s: passed %d of the %d times in a row needed", what, p.passes, cfg.Successes)
	case p.fails > 0:
		return fmt.Sprintf("%s: failed %d times in a row: %v", what, p.fails, p.lastErr)
	}
	return what + ": not sent yet"
}

// SendProbe sends ap's probe once through d and returns the round trip:
// the connect for tcp, until the response header for http, the lookup for
// dns. Names of tcp and http probes are resolved with resolve, the name of
// a dns probe with query. Health sends probes itself; SendProbe is for
// one-off checks.
func SendProbe(ctx context.Context, ap *policy.AccessPoint, d *Dialer, resolve, query LookupFunc) (time.Duration, error) {
	dial := func(ctx context.Context, target string) (net.Conn, error) {
		return dialProbe(ctx, ap, d, resolve, target)
	}
	return sendProbe(ctx, ap, dial, query)
}

// sendProbe is SendProbe with the connections of tcp and http probes made
// by dial, which gets the probe's host:port.
func sendProbe(ctx context.Context, ap *policy.AccessPoint, dial func(context.Context, string) (net.Conn, error), query LookupFunc) (time.Duration, error) {
	p := ap.Probe
	start := time.Now()
	switch p.Kind {
	case policy.ProbeTCP:
		c, err := dial(ctx, p.Target)
		if err != nil {
			return 0, err
		}
		rtt := time.Since(start)
		c.Close()
		return rtt, nil

	case policy.ProbeHTTP:
		return probeHTTP(ctx, ap, dial)

	case policy.ProbeDNS:
		if query == nil {
			return 0, errNoResolver
		}
		addrs, err := query(ctx, ap, p.Target)
		if err != nil {
			return 0, err
		}
		if len(addrs) == 0 {
			return 0, fmt.Errorf("resolving %s: no addresses", p.Target)
		}
		return time.Since(start), nil
	}
	return 0, fmt.Errorf("unknown probe kind %d", p.Kind)
}

// probeHTTP sends GET to the probe's URL over one fresh connection and
// checks the status. Redirects are not followed: a captive portal answers
// with one, and that must count as a failure.
func probeHTTP(ctx context.Context, ap *policy.AccessPoint, dial func(context.Context, string) (net.Conn, error)) (time.Duration, error) {
	p := ap.Probe
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dial(ctx, addr)
		},
		DisableKeepAlives:  true,
		DisableCompression: true,
		TLSClientConfig:    &tls.Config{MinVersion: tls.VersionTLS12},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{
		Transport:     tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.Target, nil)
	if err != nil {
		return 0, fmt.Errorf("building probe request: %w", err)
	}
	req.Header.Set("User-Agent", "iapd-probe")

	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	rtt := time.Since(start)
	io.Copy(io.Discard, io.LimitReader(resp.Body, maxProbeBody))
	resp.Body.Close()
	if resp.StatusCode != p.Status {
		return 0, fmt.Errorf("GET %s: status %d, want %d", p.Target, resp.StatusCode, p.Status)
	}
	return rtt, nil
}

// dialProbe resolves the host of target (host:port) and dials its
// addresses through d in order until one connects.
func dialProbe(ctx context.Context, ap *policy.AccessPoint, d *Dialer, resolve LookupFunc, target string) (net.Conn, error) {
	host, portText, err := net.SplitHostPort(target)
	if err != nil {
		return nil, fmt.Errorf("probe target %q: %w", target, err)
	}
	port, err := strconv.ParseUint(portText, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("probe target %q: invalid port", target)
	}

	var addrs []netip.Addr
	if addr, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{addr}
	} else {
		if resolve == nil {
			return nil, errNoResolver
		}
		if addrs, err = resolve(ctx, ap, host); err != nil {
			return nil, err
		}
		if len(addrs) == 0 {
			return nil, fmt.Errorf("resolving %s: no addresses", host)
		}
	}

	var firstErr error
	for _, addr := range addrs {
		c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(addr.Unmap(), uint16(port)).String())
		if err == nil {
			return c, nil
		}
		if firstErr == nil {
			firstErr = err
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, firstErr
}
