package policy

import (
	"fmt"
	"strings"
)

// Usability reports whether an access point can carry a connection now and,
// when it cannot, why. The iface package implements it over a snapshot of
// interface state; tests implement it with a map.
type Usability interface {
	Usable(ap *AccessPoint) (ok bool, reason string)
}

// Identify returns the app that a client of l belongs to. hasCredentials
// tells an empty user name apart from no credentials at all.
func (l *Listener) Identify(user, password string, hasCredentials bool) (*App, error) {
	if !l.HasUsers() {
		return l.App, nil
	}
	if !hasCredentials {
		return nil, ErrCredentialsRequired
	}

	u, ok := l.Users[user]
	if !ok {
		// Spend the time of a real check, so that a client cannot tell
		// unknown users from wrong passwords by the reply time.
		l.unknownUserSecret().check(password)
		return nil, ErrBadCredentials
	}
	if !u.CheckPassword(password) {
		return nil, ErrBadCredentials
	}
	return u.App, nil
}

// Plan is the decision for one connection: the destination that applies
// and its access points that are usable now, in the order to try them.
type Plan struct {
	App         *App
	Destination *Destination
	Candidates  []*AccessPoint
	Unusable    []Unusable
}

// Unusable is an access point left out of a plan, with the reason.
type Unusable struct {
	AccessPoint *AccessPoint
	Reason      string
}

// NewPlan decides which access points may carry a connection of app to
// target (host:port as the client sent it). It does no I/O.
func NewPlan(app *App, target string, u Usability) Plan {
	p := Plan{App: app, Destination: app.Destination}
	for _, ap := range app.Destination.AccessPoints {
		ok, reason := u.Usable(ap)
		if !ok {
			p.Unusable = append(p.Unusable, Unusable{AccessPoint: ap, Reason: reason})
			continue
		}
		p.Candidates = append(p.Candidates, ap)
	}
	return p
}

// Err returns nil when the plan has a candidate, and otherwise an error
// wrapping ErrNoUsableAccessPoint that names the destination and why each
// access point was left out.
func (p Plan) Err() error {
	if len(p.Candidates) > 0 {
		return nil
	}
	reasons := make([]string, 0, len(p.Unusable))
	for _, u := range p.Unusable {
		reasons = append(reasons, fmt.Sprintf("%s: %s", u.AccessPoint.Name, u.Reason))
	}
	return fmt.Errorf("destination %q: %w (%s)", p.Destination.Name, ErrNoUsableAccessPoint, strings.Join(reasons, "; "))
}
