package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"iapd/admin"
	"iapd/dns"
	"iapd/iface"
	"iapd/policy"
)

// hasPolicyFlag reports whether args name a policy file with -c, which
// makes explain read the file instead of asking the running daemon.
func hasPolicyFlag(args []string) bool {
	for _, a := range args {
		if a == "-c" || a == "--c" || strings.HasPrefix(a, "-c=") || strings.HasPrefix(a, "--c=") {
			return true
		}
	}
	return false
}

// explainPolicyCommand prints what iapd would do with one connection, as
// writeExplain describes, from the policy file and the interfaces as they
// are now. It dials nothing and sends no DNS query, unless -probe sends
// the probes once.
func explainPolicyCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("explain", stderr)
	path := fs.String("c", defaultPolicyPath, "policy `file` to read")
	appName := fs.String("app", "", "`name` of the app")
	target := fs.String("target", "", "`host:port` the app connects to; it is not dialled")
	choice := fs.String("choice", "", "access point or destination the client chooses, as in user+`NAME`")
	probe := fs.Bool("probe", false, "send each access point's probe once, out of its interface; needs the capabilities of iapd run, and a running iapd's routing tables for interfaces without a main-table route")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *appName == "" || *target == "" {
		return usageError{fmt.Errorf("explain needs -app and -target")}
	}
	if err := checkTarget(*target); err != nil {
		return usageError{err}
	}

	pol, err := policy.Load(*path)
	if err != nil {
		printPolicyError(stderr, *path, err)
		return errSilent
	}
	app, ok := pol.Apps[*appName]
	if !ok {
		return usageError{fmt.Errorf("no app named %q in %s; apps: %s", *appName, *path, strings.Join(sortedKeys(pol.Apps), ", "))}
	}

	quiet := slog.New(slog.DiscardHandler)
	c := &explainConditions{pol: pol}
	if mon, err := iface.NewMonitor(quiet); err == nil {
		c.snap = mon.Snapshot()
		defer mon.Close()
		if *probe {
			c.probes = sendProbes(pol, mon)
		}
	} else {
		fmt.Fprintf(stdout, "note: interface state unknown (%v)\n", err)
	}

	plan := policy.NewOverridePlan(app, *target, *choice, c)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	writeExplain(ctx, stdout, plan, *target, c, dns.DiscoverConfig{Logger: quiet})

	// Exit 1 when the connection would be refused, as explain against a
	// running iapd does, so that scripts can test a policy.
	if plan.Refused() != nil || len(plan.Candidates) == 0 {
		return errSilent
	}
	return nil
}

// checkTarget checks that target is host:port with a port from 1 to 65535.
func checkTarget(target string) error {
	host, port, err := net.SplitHostPort(target)
	if err == nil && host != "" {
		if n, perr := strconv.ParseUint(port, 10, 16); perr == nil && n > 0 {
			return nil
		}
	}
	return fmt.Errorf("invalid -target %q: want host:port with a port from 1 to 65535, like example.com:443", target)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// probeOutcome is the result of one probe that explain sent.
type probeOutcome struct {
	rtt time.Duration
	err error
}

// sendProbes sends, all at once, the probe of each access point of the
// policy that has one, and waits for them. Every access point is probed,
// because routes may send the target to any destination.
func sendProbes(pol *policy.Policy, monitor *iface.Monitor) map[*policy.AccessPoint]probeOutcome {
	logger := slog.New(slog.DiscardHandler)
	var mu sync.Mutex
	var wg sync.WaitGroup
	outcomes := make(map[*policy.AccessPoint]probeOutcome)
	for _, ap := range pol.AccessPointOrder {
		if ap.Probe == nil {
			continue
		}
		dialer := iface.NewDialer(pol, ap, monitor)
		// A fresh resolver has nothing cached, so a dns probe asks the
		// servers.
		resolver := newExplainResolver(ap, dialer, logger)
		lookup := func(ctx context.Context, _ *policy.AccessPoint, host string) ([]netip.Addr, error) {
			return resolver.LookupNetIP(ctx, host)
		}
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), ap.Probe.Timeout)
			defer cancel()
			rtt, err := iface.SendProbe(ctx, ap, dialer, lookup, lookup)
			mu.Lock()
			outcomes[ap] = probeOutcome{rtt: rtt, err: err}
			mu.Unlock()
		})
	}
	wg.Wait()
	return outcomes
}

// newExplainResolver returns an uncached resolver of ap that queries
// through d.
//
// NOTE: an access point with dns: auto has no servers here, because
// explain does not look them up for probes, so names in its probe fail.
func newExplainResolver(ap *policy.AccessPoint, d *iface.Dialer, logger *slog.Logger) *dns.Resolver {
	if ap.SystemDNS {
		return dns.System()
	}
	return dns.New(dns.Config{
		Name:      ap.Name,
		Servers:   ap.DNS,
		Search:    ap.Search,
		Timeouts:  ap.DNSTimeouts,
		Dial:      d.DialContext,
		Logger:    logger,
		CacheSize: -1,
	})
}

// explainConditions is policy.Conditions for explain: interface state read
// once, and the probes explain sent, if any. No access point is held down,
// because explain does not know when one came back.
type explainConditions struct {
	pol    *policy.Policy
	snap   *iface.Snapshot                      // nil when interface state is unknown
	probes map[*policy.AccessPoint]probeOutcome // nil when probes were not sent
}

func (c *explainConditions) Status(ap *policy.AccessPoint) policy.Status {
	var st policy.Status
	if c.snap == nil {
		st.Reason = "interface state unknown"
		st.Link = c.pol.Link(ap.Interface)
		return st
	}
	st.Usable, st.Reason = c.snap.Usable(ap)
	st.IPv4, st.IPv6 = c.snap.Families(ap)
	st.Link = c.snap.Link(c.pol, ap)
	p := ap.Probe
	if p == nil {
		return st
	}

	what := fmt.Sprintf("%s %s every %s", p.Kind, p.Target, p.Interval)
	outcome, sent := c.probes[ap]
	switch {
	case c.probes == nil:
		st.Probe = what + ": not sent; add -probe to send it once"
	case !sent:
		st.Probe = what + ": not sent"
	case outcome.err != nil:
		st.Probe = fmt.Sprintf("%s: failed: %v", what, outcome.err)
		if st.Usable {
			st.Usable, st.Reason = false, fmt.Sprintf("probe failed: %v", outcome.err)
		}
	default:
		st.Probe = fmt.Sprintf("%s: passed, %s", what, outcome.rtt.Round(time.Microsecond))
		st.Latency = outcome.rtt
	}
	return st
}

func (c *explainConditions) Now() time.Time                                  { return time.Now() }
func (c *explainConditions) Current(*policy.Destination) *policy.AccessPoint { return nil }
func (c *explainConditions) Turn(*policy.Destination) uint64                 { return 0 }

// writeExplain prints plan, made under c for a connection to target, for
// people. It shows the route, the destination and its rules, and each
// access point with its link facts, whether it can carry the connection
// and why not, its probe and its DNS servers. Then it names the access
// point that would be used.
func writeExplain(ctx context.Context, w io.Writer, plan policy.Plan, target string, c policy.Conditions, discover dns.DiscoverConfig) {
	fmt.Fprintf(w, "app:         %s\n", plan.App.Name)
	fmt.Fprintf(w, "target:      %s (not dialled)\n", target)
	if plan.Choice != "" {
		fmt.Fprintf(w, "choice:      %s\n", plan.Choice)
	}
	if plan.Route != nil {
		fmt.Fprintf(w, "route:       %s (line %d)\n", plan.Route.Describe(), plan.Route.Line)
	} else {
		fmt.Fprintf(w, "route:       none matches; the app's destination applies\n")
	}
	if err := plan.Refused(); err != nil {
		fmt.Fprintf(w, "\nwould use: none; refused by the policy: %v\n", err)
		return
	}
	ex := admin.ExplainPlan(plan, target, c, func(ap *policy.AccessPoint) string { return ap.Interface })
	fmt.Fprintf(w, "destination: %s\n", ex.Destination)
	fmt.Fprintf(w, "rules:       %s\n", ex.Rules)
	if ex.Requires != "" {
		fmt.Fprintf(w, "requires:    %s\n", ex.Requires)
	}

	fmt.Fprintf(w, "\naccess points, in the destination's order:\n")
	for i, ap := range plan.Destination.AccessPoints {
		e := ex.AccessPoints[i]
		fmt.Fprintf(w, "  %d. %s: %s (%s)\n", i+1, ap.Name, describeInterface(ap, c.Status(ap).Link), e.Link)
		fmt.Fprintf(w, "       %s\n", explainedState(e))
		if e.Probe != "" {
			fmt.Fprintf(w, "       probe: %s\n", e.Probe)
		}
		if ap.Proxy != nil {
			fmt.Fprintf(w, "       gateway proxy: %s; target names go to it unresolved\n", ap.Proxy)
		}
		fmt.Fprintf(w, "       dns: %s\n", describeDNS(ctx, ap, discover))
	}

	fmt.Fprintln(w)
	if ex.Chosen == "" {
		fmt.Fprintf(w, "would use: none; SOCKS5 clients get reply 3 (network unreachable) and HTTP clients 503 with:\n  %s\n", ex.Error)
		return
	}
	fmt.Fprintf(w, "would use: %s, %s\n", ex.Chosen, ex.Why)
	if len(plan.Candidates) > 1 {
		var rest []string
		for _, ap := range plan.Candidates[1:] {
			rest = append(rest, ap.Name)
		}
		fmt.Fprintf(w, "then:      %s\n", strings.Join(rest, ", "))
	}
}

// describeInterface names the interface of ap; for interface: default,
// also the one that holds the default route now.
func describeInterface(ap *policy.AccessPoint, l policy.Link) string {
	if !ap.IsDefault() {
		return "interface " + ap.Interface
	}
	if l.Interface != policy.DefaultInterface {
		return "interface default, now " + l.Interface
	}
	return "interface default"
}

// explainedState returns whether an access point would be tried, and why
// not.
func explainedState(e admin.ExplainedAccess) string {
	switch {
	case e.Filtered:
		return "usable, but left out: " + e.Reason
	case e.Reason != "":
		return "unusable: " + e.Reason
	case e.HeldUntil != nil:
		return "usable, held down until " + e.HeldUntil.Format(time.TimeOnly)
	}
	return "usable"
}

// describeDNS returns which servers ap uses and where they come from.
func describeDNS(ctx context.Context, ap *policy.AccessPoint, cfg dns.DiscoverConfig) string {
	switch {
	case ap.SystemDNS:
		return "the host's resolver (dns: system)"
	case ap.AutoDNS:
		l, err := dns.Discover(ctx, cfg, ap.Interface)
		if err != nil {
			return "auto: none found: " + strings.ReplaceAll(err.Error(), "\n", "; ")
		}
		if len(ap.Search) > 0 {
			l.Search = ap.Search
		}
		s := "auto: " + l.String()
		if len(l.Dropped) > 0 {
			s += "; left out " + strings.Join(l.Dropped, "; ")
		}
		return s
	case len(ap.DNS) == 0:
		return "none (names go to the gateway proxy)"
	}
	servers := make([]string, len(ap.DNS))
	for i, s := range ap.DNS {
		servers[i] = s.String()
	}
	s := strings.Join(servers, ", ")
	if len(ap.Search) > 0 {
		s += " search " + strings.Join(ap.Search, " ")
	}
	return s + " from the policy"
}
