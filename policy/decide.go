package policy

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
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
func (l *Listener) Identify(user, password string, hasCredentials bool) (*App, string, error) {
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
		l.unknownUserSecret().check(password)
		return nil, "", ErrBadCredentials
	}
	if !u.CheckPassword(password) {
		return nil, "", ErrBadCredentials
	}
	return u.App, choice, nil
}

// Plan is the decision for one connection: the destination that applies
// and its access points that are usable now, in the order to try them.
type Plan struct {
	App         *App
	Destination *Destination // nil when the connection is refused
	Route       *Route       // route that chose Destination; nil for the app's own destination
	Choice      string       // access point or destination the client chose; "" for none
	Candidates  []*AccessPoint
	Unusable    []Unusable

	refused error // wraps ErrNotAllowed; nil when allowed
}

// Unusable is an access point left out of a plan, with the reason.
type Unusable struct {
	AccessPoint *AccessPoint
	Reason      string
}

// NewPlan decides which access points may carry a connection of app to
// target (host:port as the client sent it). It does no I/O.
func NewPlan(app *App, target string, u Usability) Plan {
	return NewOverridePlan(app, target, "", u)
}

// NewOverridePlan is NewPlan for a client that chose an access point or
// destination by name (see Identify); choice "" means none. The app's
// routes apply first: a route that rejects the target refuses it, and a
// target that a route sends to a destination may be narrowed only to one
// of that destination's access points, so that a routed name is never
// resolved elsewhere. A choice that the app does not allow is refused.
func NewOverridePlan(app *App, target, choice string, u Usability) Plan {
	host, port, hasPort := splitHostPort(target)
	return newPlan(app, host, port, hasPort, choice, u)
}

// NewResolvePlan decides which access points may resolve name for app,
// for the app's DNS listener, where the port of the coming connection is
// not known. Routes are matched as matchRoute describes for that case.
func NewResolvePlan(app *App, name string, u Usability) Plan {
	return newPlan(app, name, 0, false, "", u)
}

func newPlan(app *App, host string, port uint16, hasPort bool, choice string, u Usability) Plan {
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

	for _, ap := range p.Destination.AccessPoints {
		ok, reason := u.Usable(ap)
		if !ok {
			p.Unusable = append(p.Unusable, Unusable{AccessPoint: ap, Reason: reason})
			continue
		}
		p.Candidates = append(p.Candidates, ap)
	}
	return p
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
