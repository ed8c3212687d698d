package policy

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// This file contains the raw schema of what decides whether and how well
// an access point carries traffic: its health probe, the interfaces
// section, and an app's requirements.

// rawProbe is an access point's probe map.
type rawProbe struct {
	// TCP (key tcp) connects to "host:port" and closes. host is an IP
	// address or a name that the access point's resolver looks up. Give
	// exactly one of tcp, http and dns.
	TCP text
	// HTTP (key http) sends GET to an http:// or https:// URL and expects
	// status. Give exactly one of tcp, http and dns.
	HTTP text
	// DNS (key dns) looks up a name with the access point's own resolver,
	// bypassing its cache, and expects at least one address. Give exactly
	// one of tcp, http and dns.
	DNS text
	// Status (key status, optional) is the HTTP status that counts as a
	// pass, 100 to 599. Only with http. Default 200.
	Status int64
	// Interval (key interval, optional) is the time between probes, at
	// least 100ms. Default 10s.
	Interval time.Duration
	// Timeout (key timeout, optional) bounds one probe, above zero and at
	// most interval. Default 2s, or the interval when that is shorter.
	Timeout time.Duration
	// Failures (key failures, optional) is how many probes in a row must
	// fail before the access point is unusable, 1 to 100. Default 3.
	Failures int64
	// Successes (key successes, optional) is how many probes in a row must
	// pass before an access point that failed is usable again, 1 to 100.
	// Default 2.
	Successes int64
	// DialFailures (key dial_failures, optional) is how many dials of real
	// connections in a row must fail before the access point is unusable
	// without waiting for the probe, 0 to 100. A dial counts when it times
	// out, finds no route or gets no DNS answer. 0 turns it off. Default 3.
	DialFailures int64

	kind        ProbeKind
	statusPos   position // zero when absent
	intervalPos position // zero when absent
	timeoutPos  position // zero when absent
	pos         position
}

var probeKeys = []string{"tcp", "http", "dns", "status", "interval", "timeout", "failures", "successes", "dial_failures"}

func (p *rawProbe) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	p.pos = posOf(n)
	p.Status = DefaultProbeStatus
	p.Interval = DefaultProbeInterval
	p.Failures = DefaultProbeFailures
	p.Successes = DefaultProbeSuccesses
	p.DialFailures = DefaultProbeDialFailures
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(probeKeys, ", ")+")") {
		return errs.err()
	}

	var targets []text
	eachField(&errs, n, probeKeys, func(key string, v *yaml.Node) {
		switch key {
		case "tcp":
			p.TCP = decodeText(&errs, key, v)
			if p.TCP.IsSet() {
				targets = append(targets, p.TCP)
				p.kind = ProbeTCP
				checkProbeTCP(&errs, key, p.TCP)
			}
		case "http":
			p.HTTP = decodeText(&errs, key, v)
			if p.HTTP.IsSet() {
				targets = append(targets, p.HTTP)
				p.kind = ProbeHTTP
				checkProbeURL(&errs, key, p.HTTP)
			}
		case "dns":
			p.DNS = decodeText(&errs, key, v)
			if p.DNS.IsSet() {
				targets = append(targets, p.DNS)
				p.kind = ProbeDNS
				if msg := checkDomainName(strings.TrimSuffix(p.DNS.Value, ".")); msg != "" {
					errs.add(p.DNS.Pos, key, "invalid domain name %q: %s", p.DNS.Value, msg)
				}
			}
		case "status":
			if v, t, ok := decodeInt(&errs, key, v); ok {
				p.statusPos = t.Pos
				if v < 100 || v > 599 {
					errs.add(t.Pos, key, "status %s out of range 100 to 599", t.Value)
					return
				}
				p.Status = v
			}
		case "interval":
			if d, t, ok := decodeDuration(&errs, key, v); ok {
				p.intervalPos = t.Pos
				if d < MinProbeInterval {
					errs.add(t.Pos, key, "interval %s is shorter than the minimum %s", t.Value, MinProbeInterval)
					return
				}
				p.Interval = d
			}
		case "timeout":
			if d, t, ok := decodeDuration(&errs, key, v); ok {
				p.timeoutPos = t.Pos
				if d == 0 {
					errs.add(t.Pos, key, "timeout must be above zero")
					return
				}
				p.Timeout = d
			}
		case "failures", "successes", "dial_failures":
			v, t, ok := decodeInt(&errs, key, v)
			if !ok {
				return
			}
			least := int64(1)
			if key == "dial_failures" {
				least = 0
			}
			if v < least || v > 100 {
				errs.add(t.Pos, key, "%s %s out of range %d to 100", key, t.Value, least)
				return
			}
			switch key {
			case "failures":
				p.Failures = v
			case "successes":
				p.Successes = v
			default:
				p.DialFailures = v
			}
		}
	})

	switch {
	case len(targets) == 0 && len(errs) == 0:
		errs.add(p.pos, "", "missing tcp, http or dns (what the probe sends)")
	case len(targets) > 1:
		errs.add(targets[1].Pos, "", "more than one of tcp, http and dns given, a probe sends exactly one")
	}
	if p.statusPos.IsSet() && p.kind != ProbeHTTP && len(targets) == 1 {
		errs.add(p.statusPos, "status", "only with http, the other probes have no status")
	}
	switch {
	case p.Timeout == 0:
		p.Timeout = min(DefaultProbeTimeout, p.Interval)
	case p.Timeout > p.Interval:
		errs.add(p.timeoutPos, "timeout", "timeout %s is longer than the interval %s; a probe must end before the next one starts", p.Timeout, p.Interval)
	}
	return errs.err()
}

// checkProbeTCP checks that a tcp probe's target is host:port.
func checkProbeTCP(errs *ErrorList, key string, t text) {
	host, port, err := net.SplitHostPort(t.Value)
	if err != nil || host == "" {
		errs.add(t.Pos, key, "invalid target %q: want host:port, like 192.0.2.1:443 or example.com:443", t.Value)
		return
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		errs.add(t.Pos, key, "invalid target %q: port must be a number from 1 to 65535", t.Value)
	}
}

// checkProbeURL checks that an http probe's target is an absolute http or
// https URL with a host.
func checkProbeURL(errs *ErrorList, key string, t text) {
	u, err := url.Parse(t.Value)
	switch {
	case err != nil:
		errs.add(t.Pos, key, "invalid URL %q", t.Value)
	case u.Scheme != "http" && u.Scheme != "https":
		errs.add(t.Pos, key, "invalid URL %q: the scheme must be http or https", t.Value)
	case u.Hostname() == "":
		errs.add(t.Pos, key, "invalid URL %q: missing host", t.Value)
	case u.User != nil:
		errs.add(t.Pos, key, "invalid URL %q: credentials in a probe URL are not supported", t.Value)
	}
}

// rawInterface is one entry of the interfaces section: facts about an
// interface that the kernel does not tell.
type rawInterface struct {
	Name    string
	NamePos position

	// Type (key type, optional) is wifi, ethernet, cellular or vpn: what
	// app requirements match. Default: none, which no requirement on
	// types accepts.
	Type text
	// Cost (key cost, optional) orders access points under select: cost,
	// lowest first, 0 to 1000000. Default 0.
	Cost int64
	// Metered (key metered, optional) is whether traffic on the
	// interface is charged by volume. Default true for type cellular,
	// false otherwise.
	Metered text

	linkType LinkType
	metered  bool
	pos      position
}

var interfaceKeys = []string{"type", "cost", "metered"}

var linkTypes = []LinkType{LinkWifi, LinkEthernet, LinkCellular, LinkVPN}

func (ri *rawInterface) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	ri.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(interfaceKeys, ", ")+")") {
		return errs.err()
	}

	meteredSet := false
	eachField(&errs, n, interfaceKeys, func(key string, v *yaml.Node) {
		switch key {
		case "type":
			ri.Type = decodeText(&errs, key, v)
			if ri.Type.IsSet() {
				ri.linkType = parseLinkType(&errs, key, ri.Type)
			}
		case "cost":
			if v, t, ok := decodeInt(&errs, key, v); ok {
				if v < 0 || v > 1000000 {
					errs.add(t.Pos, key, "cost %s out of range 0 to 1000000", t.Value)
					return
				}
				ri.Cost = v
			}
		case "metered":
			if v, t, ok := decodeBool(&errs, key, v); ok {
				ri.metered, ri.Metered, meteredSet = v, t, true
			}
		}
	})
	if !meteredSet {
		ri.metered = ri.linkType == LinkCellular
	}
	return errs.err()
}

// parseLinkType parses wifi, ethernet, cellular or vpn, adding an error at
// t for anything else.
func parseLinkType(errs *ErrorList, path string, t text) LinkType {
	for _, lt := range linkTypes {
		if t.Value == string(lt) {
			return lt
		}
	}
	errs.add(t.Pos, path, "invalid interface type %q: must be wifi, ethernet, cellular or vpn", t.Value)
	return ""
}

// rawRequirement is an app's require map.
type rawRequirement struct {
	// Types (key types, optional) lists the interface types the app
	// accepts: wifi, ethernet, cellular, vpn, each once. An access point
	// whose interface has another type, or none, is left out.
	Types []text
	// Metered (key metered, optional): false accepts only unmetered
	// access points, true only metered ones. Absent accepts both.
	Metered text

	types   []LinkType
	metered *bool
}

var requirementKeys = []string{"types", "metered"}

func (r *rawRequirement) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(requirementKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, requirementKeys, func(key string, v *yaml.Node) {
		switch key {
		case "types":
			r.Types = decodeTextList(&errs, key, v, "interface types")
			if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
				errs.add(posOf(v), key, "empty list; leave types out to accept every type")
			}
			seen := make(map[LinkType]int)
			for i, t := range r.Types {
				if !t.IsSet() {
					continue
				}
				path := fmt.Sprintf("%s[%d]", key, i)
				lt := parseLinkType(&errs, path, t)
				if lt == "" {
					continue
				}
				if line, dup := seen[lt]; dup {
					errs.add(t.Pos, path, "type %q listed twice (first at line %d)", t.Value, line)
					continue
				}
				seen[lt] = t.Pos.Line
				r.types = append(r.types, lt)
			}
		case "metered":
			if v, t, ok := decodeBool(&errs, key, v); ok {
				r.Metered, r.metered = t, &v
			}
		}
	})
	return errs.err()
}
