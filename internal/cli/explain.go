package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

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

// explainPolicyCommand prints what iapd would do with one connection: the route
// that matches, the destination, each access point with whether it is
// usable now and where its DNS servers come from, and the one that would
// be tried first. It dials nothing and sends no DNS query.
func explainPolicyCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("explain", stderr)
	path := fs.String("c", defaultPolicyPath, "policy `file` to read")
	appName := fs.String("app", "", "`name` of the app")
	target := fs.String("target", "", "`host:port` the app connects to")
	choice := fs.String("choice", "", "access point or destination the client chooses, as in user+`NAME`")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *appName == "" || *target == "" {
		return usageError{fmt.Errorf("explain needs -app and -target")}
	}
	if _, _, err := net.SplitHostPort(*target); err != nil {
		return usageError{fmt.Errorf("invalid -target %q: want host:port", *target)}
	}

	pol, err := policy.Load(*path)
	if err != nil {
		printPolicyError(stderr, *path, err)
		return errSilent
	}
	app, ok := pol.Apps[*appName]
	if !ok {
		return usageError{fmt.Errorf("no app named %q in %s", *appName, *path)}
	}

	quiet := slog.New(slog.DiscardHandler)
	var usability policy.Usability = unknownUsability{}
	if mon, err := iface.NewMonitor(quiet); err == nil {
		usability = mon.Snapshot()
		defer mon.Close()
	} else {
		fmt.Fprintf(stdout, "note: interface state unknown (%v)\n", err)
	}

	plan := policy.NewOverridePlan(app, *target, *choice, usability)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	writeExplain(ctx, stdout, plan, *target, dns.DiscoverConfig{Logger: quiet})
	return nil
}

// unknownUsability is used when interface state cannot be read.
type unknownUsability struct{}

func (unknownUsability) Usable(*policy.AccessPoint) (bool, string) {
	return false, "interface state unknown"
}

// writeExplain prints plan for people, one fact a line.
func writeExplain(ctx context.Context, w io.Writer, plan policy.Plan, target string, discover dns.DiscoverConfig) {
	fmt.Fprintf(w, "app:         %s\n", plan.App.Name)
	fmt.Fprintf(w, "target:      %s\n", target)
	if plan.Choice != "" {
		fmt.Fprintf(w, "choice:      %s\n", plan.Choice)
	}
	if plan.Route != nil {
		fmt.Fprintf(w, "route:       %s (line %d)\n", plan.Route.Describe(), plan.Route.Line)
	} else {
		fmt.Fprintf(w, "route:       none matches; the app's destination applies\n")
	}
	if err := plan.Refused(); err != nil {
		fmt.Fprintf(w, "result:      refused: %v\n", err)
		return
	}
	fmt.Fprintf(w, "destination: %s\n", plan.Destination.Name)

	usable := make(map[*policy.AccessPoint]bool)
	for _, ap := range plan.Candidates {
		usable[ap] = true
	}
	reasons := make(map[*policy.AccessPoint]string)
	for _, u := range plan.Unusable {
		reasons[u.AccessPoint] = u.Reason
	}
	fmt.Fprintln(w, "access points:")
	for i, ap := range plan.Destination.AccessPoints {
		state := "usable"
		if !usable[ap] {
			state = "not usable: " + reasons[ap]
		}
		fmt.Fprintf(w, "  %d. %s (interface %s): %s\n", i+1, ap.Name, ap.Interface, state)
		if ap.Proxy != nil {
			fmt.Fprintf(w, "     gateway proxy: %s; target names go to it unresolved\n", ap.Proxy)
		}
		fmt.Fprintf(w, "     dns: %s\n", describeDNS(ctx, ap, discover))
	}
	if len(plan.Candidates) > 0 {
		fmt.Fprintf(w, "result:      would try %s first\n", plan.Candidates[0].Name)
	} else {
		fmt.Fprintf(w, "result:      refused: %v\n", plan.Err())
	}
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
