package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"iapd/admin"
	"iapd/internal/event"
)

// This file contains the subcommands that talk to a running iapd over its
// control socket. Each sends its requests, prints a table for people or
// JSON for scripts (-json), and exits with a code from cli.go.

// socketEnv names the environment variable that sets the control socket of
// the commands, in place of the default.
const socketEnv = "IAPD_SOCKET"

// controlFlags are the flags every control command has.
type controlFlags struct {
	socket *string
	json   *bool
}

func addControlFlags(fs *flag.FlagSet) controlFlags {
	return controlFlags{
		socket: fs.String("socket", "", "control socket `path` of the running iapd (default $"+socketEnv+", else /run/iapd/iapd.sock when it exists, else the daemon's default)"),
		json:   fs.Bool("json", false, "print JSON instead of a table"),
	}
}

// client returns a client of the socket that the flags, IAPD_SOCKET or
// the default name.
func (f controlFlags) client() (*admin.Client, error) {
	path := *f.socket
	if path == "" {
		path = os.Getenv(socketEnv)
	}
	if path == "" {
		var err error
		if path, err = admin.ClientSocketPath(); err != nil {
			return nil, unreachableError{err}
		}
	}
	return admin.NewClient(path), nil
}

// unreachableError marks a command that could not reach iapd, which exits
// with exitUnreachable.
type unreachableError struct{ err error }

func (e unreachableError) Error() string { return e.err.Error() }
func (e unreachableError) Unwrap() error { return e.err }

// timeoutError marks a wait that ran out of time, which exits with
// exitTimeout.
type timeoutError struct{ err error }

func (e timeoutError) Error() string { return e.err.Error() }
func (e timeoutError) Unwrap() error { return e.err }

// requestError turns a client error into the error a command returns.
func requestError(err error) error {
	if errors.Is(err, admin.ErrUnreachable) {
		return unreachableError{fmt.Errorf("%w; is iapd running? (start it with iapd run, or name its socket with -socket or %s)", err, socketEnv)}
	}
	return err
}

// requestTimeout bounds one request of a command that does not follow
// events.
const requestTimeout = 10 * time.Second

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// statusDocument is the output of "iapd status -json".
type statusDocument struct {
	Status       *admin.Status             `json:"status"`
	AccessPoints []admin.AccessPointStatus `json:"access_points"`
	Destinations []admin.DestinationStatus `json:"destinations"`
	Apps         []admin.AppStatus         `json:"apps"`
	Interfaces   []admin.InterfaceStatus   `json:"interfaces"`
}

func statusCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", stderr)
	flags := addControlFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := flags.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()

	var doc statusDocument
	if doc.Status, err = c.Status(ctx); err != nil {
		return requestError(err)
	}
	if doc.AccessPoints, err = c.AccessPoints(ctx); err != nil {
		return requestError(err)
	}
	if doc.Destinations, err = c.Destinations(ctx); err != nil {
		return requestError(err)
	}
	if doc.Apps, err = c.Apps(ctx); err != nil {
		return requestError(err)
	}
	if doc.Interfaces, err = c.Interfaces(ctx); err != nil {
		return requestError(err)
	}
	if *flags.json {
		return printJSON(stdout, doc)
	}
	printStatus(stdout, &doc)
	return nil
}

func printStatus(w io.Writer, doc *statusDocument) {
	st := doc.Status
	fmt.Fprintf(w, "iapd %s, pid %d, up %s\n", st.Version, st.PID, formatAge(st.UptimeSeconds))
	fmt.Fprintf(w, "policy %s (sha256 %s)\n", st.Policy.Path, shortHash(st.Policy.Hash))
	fmt.Fprintf(w, "%d open connection(s)\n", st.Connections)

	printListeners(w, st)

	fmt.Fprintln(w)
	t := newTable(w, "ACCESS POINT", "INTERFACE", "STATE", "LATENCY", "OPEN", "TOTAL", "UP", "DOWN", "DIAL FAILURES")
	for _, ap := range doc.AccessPoints {
		state := "usable"
		if !ap.Usable {
			state = "unusable: " + ap.Reason
		}
		latency := "-"
		if ap.LatencyMS != nil {
			latency = fmt.Sprintf("%.1fms", *ap.LatencyMS)
		}
		t.row(ap.Name, ap.Device, state, latency, strconv.Itoa(ap.Connections), strconv.FormatUint(ap.Total, 10),
			formatBytes(ap.BytesUp), formatBytes(ap.BytesDown), strconv.FormatUint(ap.DialFailures, 10))
	}
	t.flush()

	fmt.Fprintln(w)
	t = newTable(w, "DESTINATION", "ACCESS POINTS", "NOW", "APPS")
	for _, d := range doc.Destinations {
		now := d.Current
		if now == "" {
			now = "none usable"
		}
		t.row(d.Name, strings.Join(d.AccessPoints, ","), now, strings.Join(d.Apps, ","))
	}
	t.flush()

	fmt.Fprintln(w)
	t = newTable(w, "APP", "DESTINATION", "OPEN", "UP", "DOWN")
	for _, app := range doc.Apps {
		t.row(app.Name, app.Destination, strconv.Itoa(app.Connections), formatBytes(app.BytesUp), formatBytes(app.BytesDown))
	}
	t.flush()
}

// printListeners writes the proxy listeners and, when the policy has
// some, the DNS listeners. OPEN counts clients from accept to close
// against MAX; REFUSED and FULL count clients closed at accept.
func printListeners(w io.Writer, st *admin.Status) {
	fmt.Fprintln(w)
	t := newTable(w, "LISTENER", "ADDRESS", "PROTOCOL", "APP", "OPEN", "MAX", "REFUSED", "FULL")
	for _, l := range st.Listeners {
		app := l.App
		if app == "" {
			app = fmt.Sprintf("users (%d)", l.UserCount)
		}
		maxConns := "-"
		if l.MaxConnections > 0 {
			maxConns = strconv.Itoa(l.MaxConnections)
		}
		t.row(l.Listen, l.Address, l.Protocol, app, strconv.Itoa(l.Connections), maxConns,
			strconv.FormatUint(l.ClientsRefused, 10), strconv.FormatUint(l.FullRejections, 10))
	}
	t.flush()

	if len(st.DNSListeners) == 0 {
		return
	}
	fmt.Fprintln(w)
	t = newTable(w, "DNS LISTENER", "ADDRESS", "APP", "QUERIES", "REFUSED", "FAILED")
	for _, l := range st.DNSListeners {
		// The UDP and the TCP socket share the port of dns_listen, so
		// one address stands for both unless they differ.
		addr := l.UDPAddress
		if l.UDPAddress != l.TCPAddress {
			addr = "udp " + l.UDPAddress + ", tcp " + l.TCPAddress
		}
		t.row(l.Listen, addr, l.App, strconv.FormatUint(l.Queries, 10),
			strconv.FormatUint(l.Refused, 10), strconv.FormatUint(l.Failed, 10))
	}
	t.flush()
}

func connsCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("conns", stderr)
	flags := addControlFlags(fs)
	closeID := fs.String("close", "", "close the connection with this `ID` instead of listing")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := flags.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()

	if *closeID != "" {
		id, err := strconv.ParseUint(*closeID, 10, 64)
		if err != nil {
			return usageError{fmt.Errorf("invalid -close %q: want a connection ID from iapd conns", *closeID)}
		}
		if err := c.CloseConn(ctx, id); err != nil {
			return requestError(err)
		}
		if !*flags.json {
			fmt.Fprintf(stdout, "closed connection %d\n", id)
		}
		return nil
	}

	conns, err := c.Conns(ctx)
	if err != nil {
		return requestError(err)
	}
	if *flags.json {
		return printJSON(stdout, conns)
	}
	t := newTable(stdout, "ID", "APP", "LISTENER", "TARGET", "ACCESS POINT", "INTERFACE", "UP", "DOWN", "AGE")
	for _, conn := range conns {
		t.row(strconv.FormatUint(conn.ID, 10), conn.App, conn.Listener, conn.Target, conn.AccessPoint, conn.Interface,
			formatBytes(conn.BytesUp), formatBytes(conn.BytesDown), formatAge(conn.AgeSeconds))
	}
	t.flush()
	return nil
}

func eventsCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("events", stderr)
	flags := addControlFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := flags.client()
	if err != nil {
		return err
	}

	// Following ends on Ctrl-C or SIGTERM, which is a normal end.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err = c.Events(ctx, nil, func(e event.Event) error {
		if *flags.json {
			data, err := json.Marshal(e)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(stdout, "%s\n", data)
			return err
		}
		_, err := fmt.Fprintln(stdout, formatEvent(e))
		return err
	})
	switch {
	case errors.Is(err, context.Canceled):
		return nil
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errors.New("iapd closed the event stream (it stopped or restarted)")
	}
	return requestError(err)
}

// formatEvent writes an event on one line: time, kind, then its fields as
// key=value, quoted where they contain spaces.
func formatEvent(e event.Event) string {
	var b strings.Builder
	b.WriteString(e.Time.Local().Format("2006-01-02T15:04:05.000Z07:00"))
	b.WriteString(" ")
	b.WriteString(string(e.Kind))
	field := func(key, value string) {
		if value == "" {
			return
		}
		if strings.ContainsAny(value, " \t\"=") {
			value = strconv.Quote(value)
		}
		fmt.Fprintf(&b, " %s=%s", key, value)
	}
	field("interface", e.Interface)
	field("access_point", e.AccessPoint)
	field("destination", e.Destination)
	field("app", e.App)
	if e.Kind == event.DestinationSwitched {
		field("from", cmpOrNone(e.From))
		field("to", cmpOrNone(e.To))
	}
	if e.Count > 0 {
		field("count", strconv.Itoa(e.Count))
	}
	field("reason", e.Reason)
	return b.String()
}

func cmpOrNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func reloadCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("reload", stderr)
	flags := addControlFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := flags.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()

	report, err := c.Reload(ctx)
	var apiErr *admin.APIError
	if errors.As(err, &apiErr) {
		if *flags.json {
			printJSON(stdout, apiErr.ErrorResponse)
			return errSilent
		}
		printProblems(stderr, apiErr)
		return apiErr
	}
	if err != nil {
		return requestError(err)
	}
	if *flags.json {
		return printJSON(stdout, report)
	}
	changed := "changed"
	if !report.Changed {
		changed = "unchanged"
	}
	// DNS listeners are named only where the policy has or had some.
	dnsListeners := ""
	if n := len(report.DNSListenersKept) + len(report.DNSListenersAdded) + len(report.DNSListenersRemoved); n > 0 {
		dnsListeners = fmt.Sprintf("; DNS listeners %d kept, %d added, %d removed",
			len(report.DNSListenersKept), len(report.DNSListenersAdded), len(report.DNSListenersRemoved))
	}
	fmt.Fprintf(stdout, "reloaded %s (sha256 %s, %s): listeners %d kept, %d added, %d removed%s; %d connection(s) closed\n",
		report.Policy.Path, shortHash(report.Policy.Hash), changed,
		len(report.ListenersKept), len(report.ListenersAdded), len(report.ListenersRemoved), dnsListeners, report.ConnectionsClosed)
	return nil
}

// printProblems prints each problem of a rejected policy with the line it
// points at, when this process can read the file.
func printProblems(w io.Writer, apiErr *admin.APIError) {
	sources := make(map[string][]byte)
	for _, p := range apiErr.Problems {
		e := p.PolicyError()
		fmt.Fprintln(w, e.Error())
		src, ok := sources[p.File]
		if !ok {
			src, _ = os.ReadFile(p.File)
			sources[p.File] = src
		}
		if snippet := e.Snippet(src); snippet != "" {
			fmt.Fprintln(w, snippet)
		}
	}
}

func explainCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("explain", stderr)
	flags := addControlFlags(fs)
	app := fs.String("app", "", "`name` of the app making the connection")
	target := fs.String("target", "", "`host:port` the app connects to")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *app == "" || *target == "" {
		return usageError{errors.New("explain needs -app NAME and -target HOST:PORT")}
	}
	c, err := flags.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()

	ex, err := c.Explain(ctx, *app, *target)
	if err != nil {
		return requestError(err)
	}
	if *flags.json {
		if err := printJSON(stdout, ex); err != nil {
			return err
		}
	} else {
		printExplanation(stdout, ex)
	}
	if ex.Chosen == "" {
		return errSilent
	}
	return nil
}

func printExplanation(w io.Writer, ex *admin.Explanation) {
	fmt.Fprintf(w, "app %s connecting to %s uses destination %s\n", ex.App, ex.Target, ex.Destination)
	if ex.Rules != "" {
		fmt.Fprintf(w, "rules: %s\n", ex.Rules)
	}
	if ex.Requires != "" {
		fmt.Fprintf(w, "requires: %s\n", ex.Requires)
	}
	t := newTable(w, "ORDER", "ACCESS POINT", "INTERFACE", "STATE")
	for _, ap := range ex.AccessPoints {
		order := "-"
		if ap.Order > 0 {
			order = strconv.Itoa(ap.Order)
		}
		t.row(order, ap.Name, ap.Interface, explainedState(ap))
	}
	t.flush()
	for _, ap := range ex.AccessPoints {
		if ap.Probe != "" {
			fmt.Fprintf(w, "probe of %s: %s\n", ap.Name, ap.Probe)
		}
	}
	if ex.Chosen != "" {
		fmt.Fprintf(w, "a new connection goes through %s now: %s\n", ex.Chosen, ex.Why)
	} else {
		fmt.Fprintf(w, "a new connection would be refused now: %s\n", ex.Error)
	}
}

// errWaitDone ends the event stream of a wait whose condition holds.
var errWaitDone = errors.New("condition met")

func waitCommand(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("wait", stderr)
	flags := addControlFlags(fs)
	apName := fs.String("access-point", "", "wait until the access point `name`d is usable")
	destName := fs.String("destination", "", "wait until the destination `name`d has a usable access point")
	timeout := fs.Duration("timeout", 0, "give up after this `duration` (0: wait for ever)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if (*apName == "") == (*destName == "") {
		return usageError{errors.New("wait needs exactly one of -access-point NAME and -destination NAME")}
	}
	c, err := flags.client()
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, *timeout, errWaitTimeout)
		defer cancel()
	}

	// The condition is checked once the stream is open and again after
	// every event, so that no change between the two is missed.
	check := func() error {
		ok, err := waitCondition(ctx, c, *apName, *destName)
		if err != nil {
			return err
		}
		if ok {
			return errWaitDone
		}
		return nil
	}
	err = c.Events(ctx, check, func(event.Event) error { return check() })
	switch {
	case errors.Is(err, errWaitDone):
		if !*flags.json {
			fmt.Fprintln(stdout, "usable")
		}
		return nil
	case errors.Is(context.Cause(ctx), errWaitTimeout):
		what := "access point " + *apName
		if *destName != "" {
			what = "destination " + *destName
		}
		return timeoutError{fmt.Errorf("%s not usable within %v", what, *timeout)}
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errors.New("iapd closed the event stream (it stopped or restarted)")
	}
	return requestError(err)
}

var errWaitTimeout = errors.New("wait timed out")

// waitCondition reports whether the access point or destination is usable
// now. An unknown name is an error, because it will not become usable.
func waitCondition(ctx context.Context, c *admin.Client, apName, destName string) (bool, error) {
	if apName != "" {
		aps, err := c.AccessPoints(ctx)
		if err != nil {
			return false, err
		}
		for _, ap := range aps {
			if ap.Name == apName {
				return ap.Usable, nil
			}
		}
		return false, fmt.Errorf("no access point named %q in the running policy", apName)
	}
	dests, err := c.Destinations(ctx)
	if err != nil {
		return false, err
	}
	for _, d := range dests {
		if d.Name == destName {
			return d.Current != "", nil
		}
	}
	return false, fmt.Errorf("no destination named %q in the running policy", destName)
}

// table writes aligned columns.
type table struct{ tw *tabwriter.Writer }

func newTable(w io.Writer, header ...string) *table {
	t := &table{tw: tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)}
	t.row(header...)
	return t
}

func (t *table) row(cells ...string) {
	fmt.Fprintln(t.tw, strings.Join(cells, "\t"))
}

func (t *table) flush() { t.tw.Flush() }

// formatBytes writes n with a binary unit: 512B, 1.5KiB, 3.2MiB.
func formatBytes(n int64) string {
	if n < 1024 {
		return strconv.FormatInt(n, 10) + "B"
	}
	v := float64(n)
	for _, unit := range []string{"KiB", "MiB", "GiB", "TiB"} {
		v /= 1024
		if v < 1024 || unit == "TiB" {
			return strconv.FormatFloat(v, 'f', 1, 64) + unit
		}
	}
	return ""
}

// formatAge writes a duration in seconds as 45s, 3m12s or 5h07m.
func formatAge(seconds float64) string {
	d := time.Duration(seconds * float64(time.Second))
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	}
	return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
}
