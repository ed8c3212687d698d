package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// defaultDNSTimeouts are the waits before asking the next DNS server when
// an access point sets no dns_timeouts: 1, 2, 4 and 8 seconds, the steps
// that Windows' DNS client uses.
var defaultDNSTimeouts = []time.Duration{1 * time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}

// compiler turns a decoded raw policy into runtime types, resolving names.
// It keeps going after a problem, so that one load reports every dangling
// name.
type compiler struct {
	raw  *rawPolicy
	errs ErrorList
	p    *Policy

	explicit map[string]*Destination // destinations written in the policy, by name
}

// compile resolves the names in raw and builds the runtime policy. The
// result is meaningful only when the returned list is empty.
func compile(raw *rawPolicy) (*Policy, ErrorList) {
	c := &compiler{
		raw:      raw,
		explicit: make(map[string]*Destination, len(raw.Destinations)),
		p: &Policy{
			Apps:         make(map[string]*App, len(raw.Apps)),
			AccessPoints: make(map[string]*AccessPoint, len(raw.AccessPoints)),
			Destinations: make(map[string]*Destination, len(raw.Destinations)),
		},
	}

	// Access points come first and destinations before apps, because each
	// stage refers to what the previous one built.
	c.accessPoints()
	c.destinations()
	c.apps()
	c.listeners()
	c.control()
	c.p.Routing = Routing{
		Table:        int(raw.Routing.Table),
		Mark:         uint32(raw.Routing.Mark),
		RulePriority: int(raw.Routing.Priority),
	}
	return c.p, c.errs
}

func (c *compiler) accessPoints() {
	for i, raw := range c.raw.AccessPoints {
		ap := &AccessPoint{
			Name:        raw.Name,
			Interface:   raw.Interface.Value,
			SystemDNS:   raw.dnsSystem.IsSet(),
			DNSTimeouts: slices.Clone(defaultDNSTimeouts),
			Index:       i,
		}
		for _, s := range raw.DNS {
			ap.DNS = append(ap.DNS, zoneDNSServer(s.Addr, ap))
		}
		for _, t := range raw.Search {
			ap.Search = append(ap.Search, t.Value)
		}
		if len(raw.DNSTimeouts) > 0 {
			ap.DNSTimeouts = make([]time.Duration, len(raw.DNSTimeouts))
			for j, d := range raw.DNSTimeouts {
				ap.DNSTimeouts[j] = d.Value
			}
		}
		for _, a := range raw.Gateway {
			ap.Gateways = append(ap.Gateways, a.Addr)
		}
		for _, a := range raw.Source {
			ap.Sources = append(ap.Sources, a.Addr)
		}

		c.p.AccessPoints[ap.Name] = ap
		c.p.AccessPointOrder = append(c.p.AccessPointOrder, ap)
	}
}

// zoneDNSServer gives an IPv6 link-local server without a zone the zone of
// ap's interface, since such an address is only reachable on one link.
// validate rejects a zone that names another interface, and a missing zone
// on interface: default.
func zoneDNSServer(s netip.AddrPort, ap *AccessPoint) netip.AddrPort {
	addr := s.Addr()
	if !addr.Is6() || !addr.IsLinkLocalUnicast() || addr.Zone() != "" || ap.IsDefault() || ap.Interface == "" {
		return s
	}
	return netip.AddrPortFrom(addr.WithZone(ap.Interface), s.Port())
}

func (c *compiler) destinations() {
	for _, raw := range c.raw.Destinations {
		d := &Destination{Name: raw.Name}
		for i, t := range raw.AccessPoints {
			if !t.IsSet() {
				continue
			}
			ap, ok := c.p.AccessPoints[t.Value]
			if !ok {
				c.errs.add(t.Pos, fmt.Sprintf("destinations.%s.access_points[%d]", raw.Name, i), "no access point named %q", t.Value)
				continue
			}
			d.AccessPoints = append(d.AccessPoints, ap)
		}
		c.explicit[d.Name] = d
		c.p.Destinations[d.Name] = d
	}
}

func (c *compiler) apps() {
	// implicit maps an access point name to the destination of one made
	// for the apps that bind to it directly. Those apps share it.
	implicit := make(map[string]*Destination)

	for _, raw := range c.raw.Apps {
		app := &App{Name: raw.Name}
		c.p.Apps[app.Name] = app

		switch {
		case raw.AccessPoint.IsSet():
			name := raw.AccessPoint.Value
			ap, ok := c.p.AccessPoints[name]
			if !ok {
				c.errs.add(raw.AccessPoint.Pos, "apps."+raw.Name+".access_point", "no access point named %q", name)
				continue
			}
			if d, ok := implicit[name]; ok {
				app.Destination = d
				continue
			}

			d := &Destination{Name: name, AccessPoints: []*AccessPoint{ap}, Implicit: true}
			implicit[name] = d
			app.Destination = d

			// The implicit destination takes the access point's name, so an
			// explicit destination of that name would make "destination=wifi"
			// in logs and the control API ambiguous.
			if rawDest := c.raw.destination(name); rawDest != nil {
				c.errs.add(rawDest.NamePos, "destinations."+name,
					"name %q is taken by the implicit destination of access point %q, which apps.%s.access_point (line %d) binds to; rename the destination",
					name, name, raw.Name, raw.AccessPoint.Pos.Line)
				continue
			}
			c.p.Destinations[name] = d

		case raw.Destination.IsSet():
			d, ok := c.explicit[raw.Destination.Value]
			if !ok {
				c.errs.add(raw.Destination.Pos, "apps."+raw.Name+".destination", "no destination named %q", raw.Destination.Value)
				continue
			}
			app.Destination = d
		}
	}
}

// destination returns the raw destination called name, or nil.
func (p *rawPolicy) destination(name string) *rawDestination {
	for _, d := range p.Destinations {
		if d.Name == name {
			return d
		}
	}
	return nil
}

func (c *compiler) listeners() {
	for i, raw := range c.raw.Listeners {
		path := fmt.Sprintf("listeners[%d]", i)
		l := &Listener{Listen: raw.Listen.Value, Protocol: raw.protocol}
		c.p.Listeners = append(c.p.Listeners, l)

		if raw.App.IsSet() {
			l.App = c.app(raw.App, path+".app")
			continue
		}
		if len(raw.Users) > 0 {
			l.Users = make(map[string]*User, len(raw.Users))
		}
		for j, ru := range raw.Users {
			userPath := fmt.Sprintf("%s.users[%d]", path, j)
			u := &User{Name: ru.Name.Value}
			if ru.App.IsSet() {
				u.App = c.app(ru.App, userPath+".app")
			}
			c.userSecret(u, ru, raw.protocol, userPath)
			if _, dup := l.Users[u.Name]; !dup {
				l.Users[u.Name] = u
			}
		}
		if l.HasUsers() && !hasBcryptUser(l) {
			l.unknownUser = plainDummySecret
		}
	}
}

// hasBcryptUser reports whether a user of l has a bcrypt hash.
func hasBcryptUser(l *Listener) bool {
	for _, u := range l.Users {
		if u.secret.hash != nil {
			return true
		}
	}
	return false
}

// app resolves an app name, adding an error at t when there is none.
func (c *compiler) app(t text, path string) *App {
	app, ok := c.p.Apps[t.Value]
	if !ok {
		c.errs.add(t.Pos, path, "no app named %q", t.Value)
	}
	return app
}

// maxSOCKS5Password is the longest password that SOCKS5 username/password
// authentication can carry (RFC 1929: one length byte).
const maxSOCKS5Password = 255

// userSecret fills u's secret from the hash in the policy or from the
// environment variable it names.
func (c *compiler) userSecret(u *User, raw *rawUser, proto Protocol, path string) {
	switch {
	case raw.PasswordHash.IsSet():
		hash := raw.PasswordHash.Value
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			c.errs.addCause(raw.PasswordHash.Pos, path+".password_hash", "invalid bcrypt hash", err)
			return
		}
		// bcrypt.Cost reads only the prefix, so a cut or mangled hash would
		// pass it and then match no password at all.
		if msg := checkBcryptBody(hash); msg != "" {
			c.errs.add(raw.PasswordHash.Pos, path+".password_hash", "invalid bcrypt hash: %s", msg)
			return
		}
		u.secret.hash = []byte(hash)

	case raw.PasswordEnv.IsSet():
		name := raw.PasswordEnv.Value
		value, ok := lookupEnv(name)
		switch {
		case !isEnvName(name):
			// Already reported while decoding.
			return
		case !ok:
			c.errs.add(raw.PasswordEnv.Pos, path+".password_env", "environment variable %s is not set", name)
			return
		case value == "":
			c.errs.add(raw.PasswordEnv.Pos, path+".password_env", "environment variable %s is empty", name)
			return
		case len(value) > maxSOCKS5Password && proto != ProtocolHTTP:
			c.errs.add(raw.PasswordEnv.Pos, path+".password_env",
				"password in %s is longer than %d bytes, which SOCKS5 cannot send; shorten it or use protocol: http", name, maxSOCKS5Password)
			return
		}
		u.secret.plain = []byte(value)
	}
}

// checkBcryptBody returns why hash, whose prefix bcrypt.Cost accepted, is
// not a whole bcrypt hash, or "". After "$2a$10$" a hash has 53 characters
// of bcrypt's base64 alphabet: 22 of salt and 31 of digest.
func checkBcryptBody(hash string) string {
	parts := strings.SplitN(hash, "$", 4)
	body := parts[len(parts)-1]
	if len(body) != 53 {
		return fmt.Sprintf("%d characters after the cost, want 53", len(body))
	}
	for _, r := range body {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '/') {
			return fmt.Sprintf("character %q outside bcrypt's base64 alphabet", r)
		}
	}
	return ""
}
