package policy

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Usability reports whether an access point can carry a connection now and,
// when it cannot, why. The iface package implements it over a snapshot of
// interface state; tests implement it with a map.
type Usability interface {
	Usable(ap *AccessPoint) (ok bool, reason string)
}

// Identify returns the app that a client of l belongs to, and the access
// point or destination that the client chose for this connection, if any.
// hasCredentials tells an empty user name apart from no credentials at
// all.
//
// A choice is written after a '+' in the user name: "dev+cell" is user dev
// choosing cell. On a listener of one app the credentials are ignored,
// except that a user name "APP+NAME", with APP the listener's app, chooses
// NAME. Identify does not check the choice; NewOverridePlan does.
func (l *Listener) Identify(user string, password Password, hasCredentials bool) (*App, string, error) {
	name, choice, _ := strings.Cut(user, "+")
	if !l.HasUsers() {
		if hasCredentials && l.App != nil && name == l.App.Name {
			return l.App, choice, nil
		}
		return l.App, "", nil
	}
	if !hasCredentials {
		return nil, "", ErrCredentialsRequired
	}

	u, ok := l.Users[name]
	if !ok {
		// Spend the time of a real check, so that a client cannot tell
		// unknown users from wrong passwords by the reply time.
		l.unknownUserSecret().check(password, false)
		return nil, "", ErrBadCredentials
	}
	if !u.CheckPassword(password) {
		return nil, "", ErrBadCredentials
	}
	return u.App, choice, nil
}

// Status is an access point's state at one moment, as far as a plan
// needs it.
type Status struct {
	Usable bool
	Reason string // the reason it is not usable; empty when it is usable

	// Since is when the access point last became usable. The zero time
	// means usable since iapd started, which no hold-down applies to.
	Since time.Time

	IPv4, IPv6 bool          // address families it can carry now: an address and a route
	Latency    time.Duration // round trip of the last probe that passed; zero when not measured
	Link       Link          // facts of the interface it sends through now
	Probe      string        // the probe's state in words, for people; empty without a probe
}

// Conditions is the state of the access points that a plan needs.
// The daemon implements it over live interface state and probes; tests
// implement it with maps. Its methods are called for every connection, so
// they must be cheap and safe for concurrent use.
type Conditions interface {
	// Status returns the state of ap now.
	Status(ap *AccessPoint) Status
	// Now returns the current time, against which hold-downs run.
	Now() time.Time
	// Current returns the access point that d put first last time the
	// daemon looked, or nil. The latency rule keeps it first while it is
	// within the tolerance.
	Current(d *Destination) *AccessPoint
	// Turn returns a number that grows by one with every call for d. The
	// round-robin rule starts at the access point it points to.
	Turn(d *Destination) uint64
}

// Plan is the decision for one connection: the destination that applies
// and its access points that may carry the connection now, in the order to
// try them.
type Plan struct {
	App         *App         // nil for a plan of a destination alone
	Destination *Destination // nil when the connection is refused
	Route       *Route       // route that chose Destination; nil for the app's own destination
	Choice      string       // access point or destination the client chose; "" for none
	Candidates  []*AccessPoint
	Unusable    []Unusable
	// Held lists the candidates that came back less than the hold-down
	// ago. They are tried after the others, at the end of Candidates.
	Held []Held
	// Why is the reason, in words, that the first candidate comes first;
	// empty when there is no candidate.
	Why string

	refused error // wraps ErrNotAllowed; nil when allowed
}

// Unusable is an access point left out of a plan, with the reason.
type Unusable struct {
	AccessPoint *AccessPoint
	Reason      string
	// Filtered is true when the access point is usable but the app's
	// requirement, or the target's address family, rules it out.
	Filtered bool
}

// Held is a usable access point that waits out its destination's hold-down
// before it is preferred again.
type Held struct {
	AccessPoint *AccessPoint
	Until       time.Time
}

// NewPlan decides which access points may carry a connection of app to
// target (host:port as the client sent it) under conditions c, and in what
// order. It does no I/O.
func NewPlan(app *App, target string, c Conditions) Plan {
	return NewOverridePlan(app, target, "", c)
}

// NewOverridePlan is NewPlan for a client that chose an access point or
// destination by name (see Identify); choice "" means none. The app's
// routes apply first: a route that rejects the target refuses it, and a
// target that a route sends to a destination may be narrowed only to one
// of that destination's access points, so that a routed name is never
// resolved elsewhere. A choice that the app does not allow is refused.
func NewOverridePlan(app *App, target, choice string, c Conditions) Plan {
	host, port, hasPort := splitHostPort(target)
	return newPlan(app, host, port, hasPort, choice, c)
}

// NewResolvePlan decides which access points may resolve name for app,
// for the app's DNS listener, where the port of the coming connection is
// not known. Routes are matched as matchRoute describes for that case.
func NewResolvePlan(app *App, name string, c Conditions) Plan {
	return newPlan(app, name, 0, false, "", c)
}

// PlanDestination orders d's access points under c for a connection of no
// particular app or target: what d prefers now. It does not take a
// round-robin turn, so a round-robin destination starts at its first
// usable access point.
func PlanDestination(d *Destination, c Conditions) Plan {
	p := Plan{Destination: d}
	p.order(Requirement{}, familyAny, c, false)
	return p
}

// Refusal returns the reason the policy refuses a connection of app to
// target with choice, wrapping ErrNotAllowed, or nil when it allows it. It
// looks at the app's routes and the choice only, not at access points, so
// it takes no round-robin turn.
func Refusal(app *App, target, choice string) error {
	host, port, hasPort := splitHostPort(target)
	return routePlan(app, host, port, hasPort, choice).refused
}

func newPlan(app *App, host string, port uint16, hasPort bool, choice string, c Conditions) Plan {
	p := routePlan(app, host, port, hasPort, choice)
	if p.refused == nil {
		p.order(app.Require, hostFamily(host), c, true)
	}
	return p
}

// routePlan returns a plan with the destination that app's routes and the
// client's choice give for host, or with the refusal, but no candidates.
func routePlan(app *App, host string, port uint16, hasPort bool, choice string) Plan {
	p := Plan{App: app, Choice: choice, Destination: app.Destination}
	if r := app.matchRoute(host, port, hasPort); r != nil {
		p.Route = r
		p.Destination = r.Destination
		if r.Reject {
			p.refused = fmt.Errorf("%w: app %q rejects %s by %s (line %d)", ErrNotAllowed, app.Name, host, r.Describe(), r.Line)
			return p
		}
	}
	if choice != "" {
		d, err := app.choose(choice, p.Route, p.Destination)
		if err != nil {
			p.Destination = nil
			p.refused = err
			return p
		}
		p.Destination = d
	}
	return p
}

// order fills the plan's candidates from its destination's access points
// under c: those usable, of the needed family and meeting req, in the
// order of the destination's rule, with those still held down last. With
// takeTurn, a round-robin destination moves on by one.
func (p *Plan) order(req Requirement, family addrFamily, c Conditions, takeTurn bool) {
	d := p.Destination
	now := c.Now()
	var settled, held []candidate
	for i, ap := range d.AccessPoints {
		st := c.Status(ap)
		if !st.Usable {
			p.Unusable = append(p.Unusable, Unusable{AccessPoint: ap, Reason: st.Reason})
			continue
		}
		if reason := family.check(st); reason != "" {
			p.Unusable = append(p.Unusable, Unusable{AccessPoint: ap, Reason: reason, Filtered: true})
			continue
		}
		if reason := req.Check(st.Link); reason != "" {
			p.Unusable = append(p.Unusable, Unusable{AccessPoint: ap, Reason: reason, Filtered: true})
			continue
		}

		cand := candidate{ap: ap, status: st, index: i}
		if until := st.Since.Add(d.HoldDown); !st.Since.IsZero() && now.Before(until) {
			p.Held = append(p.Held, Held{AccessPoint: ap, Until: until})
			held = append(held, cand)
			continue
		}
		settled = append(settled, cand)
	}

	turn := uint64(0)
	if takeTurn && d.Select == SelectRoundRobin && len(settled)+len(held) > 0 {
		turn = c.Turn(d)
	}
	settled, p.Why = order(d, settled, c, turn)
	held, heldWhy := order(d, held, c, turn)
	if len(settled) == 0 && len(held) > 0 {
		p.Why = fmt.Sprintf("%s; it came back %s ago and is held down for %s, but nothing else is usable",
			heldWhy, now.Sub(held[0].status.Since).Round(time.Millisecond), d.HoldDown)
	}
	for _, cand := range append(settled, held...) {
		p.Candidates = append(p.Candidates, cand.ap)
	}
}

// choose returns the destination that a client's choice stands for, or an
// error wrapping ErrNotAllowed. routed is the destination that route r
// chose, or the app's own when r is nil.
func (app *App) choose(choice string, r *Route, routed *Destination) (*Destination, error) {
	if !app.AllowOverride {
		return nil, fmt.Errorf("%w: app %q does not allow choosing an access point (%q); set allow_override", ErrNotAllowed, app.Name, choice)
	}
	d, ok := app.choices[choice]
	if !ok {
		return nil, fmt.Errorf("%w: app %q does not allow choosing %q", ErrNotAllowed, app.Name, choice)
	}
	if r == nil || d == routed {
		return d, nil
	}
	// A routed target keeps to its route's destination; the client may
	// only pick one of its access points.
	if len(d.AccessPoints) == 1 && slices.Contains(routed.AccessPoints, d.AccessPoints[0]) {
		return d, nil
	}
	return nil, fmt.Errorf("%w: %s sends the target to destination %q, which does not contain %q", ErrNotAllowed, r.Describe(), routed.Name, choice)
}

// splitHostPort splits a target into host and port. A target without a
// valid port counts as a bare host, which matches routes as a name looked
// up without a port does.
func splitHostPort(target string) (host string, port uint16, ok bool) {
	h, portText, err := net.SplitHostPort(target)
	if err != nil {
		return target, 0, false
	}
	n, err := strconv.ParseUint(portText, 10, 16)
	if err != nil || n == 0 {
		return h, 0, false
	}
	return h, uint16(n), true
}

// Refused returns the reason the policy refuses the connection, wrapping
// ErrNotAllowed, or nil when it does not.
func (p Plan) Refused() error { return p.refused }

// DestinationName returns the name of the plan's destination, or "" for a
// refused connection.
func (p Plan) DestinationName() string {
	if p.Destination == nil {
		return ""
	}
	return p.Destination.Name
}

// Check returns why an access point whose interface has the facts l does
// not meet r, or "" when it does.
func (r Requirement) Check(l Link) string {
	if len(r.Types) > 0 && !slices.Contains(r.Types, l.Type) {
		wanted := make([]string, len(r.Types))
		for i, t := range r.Types {
			wanted[i] = string(t)
		}
		if l.Type == "" {
			return fmt.Sprintf("interface %s has no type, and the app requires %s (set interfaces.%s.type)",
				l.Interface, strings.Join(wanted, " or "), l.Interface)
		}
		return fmt.Sprintf("interface %s is %s, and the app requires %s", l.Interface, l.Type, strings.Join(wanted, " or "))
	}
	if r.Metered != nil && *r.Metered != l.Metered {
		if l.Metered {
			return fmt.Sprintf("interface %s is metered, and the app requires unmetered", l.Interface)
		}
		return fmt.Sprintf("interface %s is unmetered, and the app requires metered", l.Interface)
	}
	return ""
}

// addrFamily is the address family that a target needs.
type addrFamily uint8

const (
	familyAny addrFamily = iota // a name, which may resolve to either
	familyIPv4
	familyIPv6
)

// hostFamily returns the family of host when it is an address.
func hostFamily(host string) addrFamily {
	addr, err := netip.ParseAddr(host)
	switch {
	case err != nil:
		return familyAny
	case addr.Unmap().Is4():
		return familyIPv4
	}
	return familyIPv6
}

// check returns why an access point in state st cannot carry a target of
// family f, or "".
func (f addrFamily) check(st Status) string {
	switch {
	case f == familyIPv4 && !st.IPv4:
		return fmt.Sprintf("interface %s has no IPv4 address and route, and the target is an IPv4 address", st.Link.Interface)
	case f == familyIPv6 && !st.IPv6:
		return fmt.Sprintf("interface %s has no IPv6 address and route, and the target is an IPv6 address", st.Link.Interface)
	}
	return ""
}

// Err returns nil when the plan has a candidate. Otherwise it returns the
// refusal (wrapping ErrNotAllowed), or an error wrapping
// ErrNoUsableAccessPoint that names the destination and why each access
// point was left out.
func (p Plan) Err() error {
	if p.refused != nil {
		return p.refused
	}
	if len(p.Candidates) > 0 {
		return nil
	}
	reasons := make([]string, 0, len(p.Unusable))
	for _, u := range p.Unusable {
		reasons = append(reasons, fmt.Sprintf("%s: %s", u.AccessPoint.Name, u.Reason))
	}
	return fmt.Errorf("destination %q: %w (%s)", p.Destination.Name, ErrNoUsableAccessPoint, strings.Join(reasons, "; "))
}
