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
	implicit map[string]*Destination // destinations of one access point, by its name
}

// compile resolves the names in raw and builds the runtime policy. The
// result is meaningful only when the returned list is empty.
func compile(raw *rawPolicy) (*Policy, ErrorList) {
	c := &compiler{
		raw:      raw,
		explicit: make(map[string]*Destination, len(raw.Destinations)),
		implicit: make(map[string]*Destination),
		p: &Policy{
			Apps:         make(map[string]*App, len(raw.Apps)),
			AccessPoints: make(map[string]*AccessPoint, len(raw.AccessPoints)),
			Destinations: make(map[string]*Destination, len(raw.Destinations)),
			Interfaces:   make(map[string]*Link, len(raw.Interfaces)),
		},
	}

	// Access points come first and destinations before apps, because each
	// stage refers to what the previous one built.
	c.interfaces()
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
	c.p.Limits = Limits{
		HandshakeTimeout: raw.Limits.HandshakeTimeout,
		DialTimeout:      raw.Limits.DialTimeout,
		IdleTimeout:      raw.Limits.IdleTimeout,
		MaxHeaderBytes:   int(raw.Limits.MaxHeaderBytes),
		AuthFailureDelay: raw.Limits.AuthFailureDelay,
	}
	return c.p, c.errs
}

func (c *compiler) interfaces() {
	for _, raw := range c.raw.Interfaces {
		c.p.Interfaces[raw.Name] = &Link{
			Interface: raw.Name,
			Type:      raw.linkType,
			Cost:      int(raw.Cost),
			Metered:   raw.metered,
		}
	}
}

func (c *compiler) accessPoints() {
	for i, raw := range c.raw.AccessPoints {
		ap := &AccessPoint{
			Name:        raw.Name,
			Interface:   raw.Interface.Value,
			SystemDNS:   raw.dnsSystem.IsSet(),
			AutoDNS:     raw.dnsAuto.IsSet(),
			DNSTimeouts: slices.Clone(defaultDNSTimeouts),
			Index:       i,

			MaxConnections: int(raw.MaxConnections),
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
		if raw.Proxy != nil && raw.Proxy.protocol != 0 {
			ap.Proxy = c.gatewayProxy(raw.Proxy, "access_points."+raw.Name+".proxy")
		}
		if rp := raw.Probe; rp != nil {
			ap.Probe = &Probe{
				Kind:         rp.kind,
				Status:       int(rp.Status),
				Interval:     rp.Interval,
				Timeout:      rp.Timeout,
				Failures:     int(rp.Failures),
				Successes:    int(rp.Successes),
				DialFailures: int(rp.DialFailures),
			}
			switch rp.kind {
			case ProbeTCP:
				ap.Probe.Target = rp.TCP.Value
			case ProbeHTTP:
				ap.Probe.Target = rp.HTTP.Value
			case ProbeDNS:
				ap.Probe.Target = rp.DNS.Value
			}
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
		d := &Destination{
			Name:      raw.Name,
			Select:    raw.selection,
			Tolerance: raw.Tolerance.Value,
			RaceDelay: raw.RaceDelay.Value,
			HoldDown:  raw.HoldDown.Value,
			OnLost:    raw.onLost,
			OnBetter:  raw.onBetter,
		}
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
	for _, raw := range c.raw.Apps {
		app := &App{
			Name:              raw.Name,
			AllowOverride:     raw.allowAll || len(raw.AllowOverride) > 0,
			Require:           Requirement{Types: raw.Require.types, Metered: raw.Require.metered},
			Priority:          int(raw.Priority),
			MaxConnections:    int(raw.MaxConnections),
			AllowLocalTargets: raw.AllowLocalTargets,
		}
		if raw.dnsListenParsed {
			app.DNSListen = raw.dnsListenAddr.String()
		}
		c.p.Apps[app.Name] = app
		path := "apps." + raw.Name

		switch {
		case raw.AccessPoint.IsSet():
			app.Destination = c.accessPointDestination(raw.AccessPoint, path+".access_point")
		case raw.Destination.IsSet():
			d, ok := c.explicit[raw.Destination.Value]
			if !ok {
				c.errs.add(raw.Destination.Pos, path+".destination", "no destination named %q", raw.Destination.Value)
				break
			}
			app.Destination = d
		}

		for _, rr := range raw.Routes {
			if r := c.route(rr, fmt.Sprintf("%s.routes[%d]", path, rr.Index)); r != nil {
				app.Routes = append(app.Routes, r)
			}
		}
	}

	// Choices come last, so that choosing an access point reuses the
	// implicit destination that an app or route made for it.
	for _, raw := range c.raw.Apps {
		c.choices(c.p.Apps[raw.Name], raw, "apps."+raw.Name+".allow_override")
	}
}

// accessPointDestination returns the implicit destination of the access
// point that t names, creating it on first use and registering it under the
// access point's name. Every app and route that names the access point
// shares it.
func (c *compiler) accessPointDestination(t text, path string) *Destination {
	name := t.Value
	ap, ok := c.p.AccessPoints[name]
	if !ok {
		c.errs.add(t.Pos, path, "no access point named %q", name)
		return nil
	}
	if d, ok := c.implicit[name]; ok {
		return d
	}

	d := &Destination{
		Name:         name,
		AccessPoints: []*AccessPoint{ap},
		Implicit:     true,
		Tolerance:    DefaultTolerance,
		RaceDelay:    DefaultRaceDelay,
		HoldDown:     DefaultHoldDown,
	}
	c.implicit[name] = d
	// The implicit destination takes the access point's name, so an
	// explicit destination of that name would make "destination=wifi" in
	// logs and the control API ambiguous.
	if rawDest := c.raw.destination(name); rawDest != nil {
		c.errs.add(rawDest.NamePos, "destinations."+name,
			"name %q is taken by the implicit destination of access point %q, which %s (line %d) binds to; rename the destination",
			name, name, path, t.Pos.Line)
		return d
	}
	c.p.Destinations[name] = d
	return d
}

// route compiles one route of an app.
func (c *compiler) route(raw *rawRoute, path string) *Route {
	r := &Route{Index: raw.Index, Line: raw.pos.Line, Ports: raw.Port}
	for _, t := range raw.DomainSuffix {
		r.Suffixes = append(r.Suffixes, t.Value)
	}
	for _, t := range raw.Domain {
		r.Domains = append(r.Domains, t.Value)
	}
	for _, p := range raw.CIDR {
		r.Prefixes = append(r.Prefixes, p.Prefix)
	}

	switch {
	case raw.Reject.IsSet():
		r.Reject = true
	case raw.AccessPoint.IsSet():
		r.Destination = c.accessPointDestination(raw.AccessPoint, path+".access_point")
	case raw.Destination.IsSet():
		d, ok := c.explicit[raw.Destination.Value]
		if !ok {
			c.errs.add(raw.Destination.Pos, path+".destination", "no destination named %q", raw.Destination.Value)
			return nil
		}
		r.Destination = d
	default:
		return nil // reported while decoding
	}
	if !r.Reject && r.Destination == nil {
		return nil
	}
	return r
}

// choices fills the names that app's clients may choose per connection.
// A name is a destination when one has it, and an access point otherwise.
func (c *compiler) choices(app *App, raw *rawApp, path string) {
	if !app.AllowOverride {
		return
	}
	app.choices = make(map[string]*Destination)
	if raw.allowAll {
		for _, ap := range c.p.AccessPointOrder {
			app.choices[ap.Name] = c.choiceOfAccessPoint(ap)
		}
		for name, d := range c.explicit {
			app.choices[name] = d
		}
		return
	}
	for i, t := range raw.AllowOverride {
		if !t.IsSet() {
			continue
		}
		if d, ok := c.explicit[t.Value]; ok {
			app.choices[t.Value] = d
			continue
		}
		ap, ok := c.p.AccessPoints[t.Value]
		if !ok {
			c.errs.add(t.Pos, fmt.Sprintf("%s[%d]", path, i), "no access point or destination named %q", t.Value)
			continue
		}
		app.choices[t.Value] = c.choiceOfAccessPoint(ap)
	}
}

// choiceOfAccessPoint returns the destination of one that choosing ap
// stands for: the implicit one when an app or route made it, else a new
// one that is not registered in Policy.Destinations, so that allowing a
// choice never adds destinations to the policy.
func (c *compiler) choiceOfAccessPoint(ap *AccessPoint) *Destination {
	if d, ok := c.implicit[ap.Name]; ok {
		return d
	}
	d := &Destination{Name: ap.Name, AccessPoints: []*AccessPoint{ap}, Implicit: true}
	c.implicit[ap.Name] = d
	return d
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
		l := &Listener{Listen: raw.Listen.Value, Protocol: raw.protocol, MaxConnections: int(raw.MaxConnections)}
		for _, p := range raw.AllowClients {
			l.AllowClients = append(l.AllowClients, p.Prefix)
		}
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
			u := &User{Name: ru.Name.Value, secret: &secret{}}
			if ru.App.IsSet() {
				u.App = c.app(ru.App, userPath+".app")
			}
			c.userSecret(u, ru, raw.protocol, userPath)
			if _, dup := l.Users[u.Name]; !dup {
				l.Users[u.Name] = u
			}
		}
		if l.HasUsers() {
			l.unknownUser = decoySecret(l, raw)
		}
	}
}

// decoySecret returns the secret to check for unknown user names on l: the
// first hashed user's in file order, so that an unknown name costs the
// same hash as a known one, or a random plain value when no user is hashed.
// Identify checks the decoy without its cache, and ignores the result.
func decoySecret(l *Listener, raw *rawListener) *secret {
	for _, ru := range raw.Users {
		if u, ok := l.Users[ru.Name.Value]; ok && u.secret.isHashed() {
			return u.secret
		}
	}
	return newPlainDecoy()
}

// app resolves an app name, adding an error at t when there is none.
func (c *compiler) app(t text, path string) *App {
	app, ok := c.p.Apps[t.Value]
	if !ok {
		c.errs.add(t.Pos, path, "no app named %q", t.Value)
	}
	return app
}

// gatewayProxy compiles an access point's proxy, reading its password
// from the environment.
func (c *compiler) gatewayProxy(raw *rawProxy, path string) *GatewayProxy {
	g := &GatewayProxy{Protocol: raw.protocol, Address: raw.address, User: raw.User.Value}
	if !raw.User.IsSet() || !raw.PasswordEnv.IsSet() || !isEnvName(raw.PasswordEnv.Value) {
		return g // reported while decoding
	}
	name := raw.PasswordEnv.Value
	value, ok := lookupEnv(name)
	switch {
	case !ok:
		c.errs.add(raw.PasswordEnv.Pos, path+".password_env", "environment variable %s is not set", name)
	case value == "":
		c.errs.add(raw.PasswordEnv.Pos, path+".password_env", "environment variable %s is empty", name)
	case len(value) > maxSOCKS5Password && raw.protocol == ProxySOCKS5:
		c.errs.add(raw.PasswordEnv.Pos, path+".password_env",
			"password in %s is longer than %d bytes, which SOCKS5 cannot send", name, maxSOCKS5Password)
	default:
		g.password = value
	}
	return g
}

// maxSOCKS5Password is the longest password that SOCKS5 username/password
// authentication can carry (RFC 1929: one length byte).
const maxSOCKS5Password = 255

// userSecret fills u's secret from the hash in the policy or from the
// environment variable it names.
func (c *compiler) userSecret(u *User, raw *rawUser, proto Protocol, path string) {
	switch {
	case raw.PasswordHash.IsSet() && strings.HasPrefix(raw.PasswordHash.Value, "$argon2"):
		h, msg := parseArgon2id(raw.PasswordHash.Value)
		if msg != "" {
			c.errs.add(raw.PasswordHash.Pos, path+".password_hash", "invalid argon2id hash: %s", msg)
			return
		}
		u.secret.argon2 = h

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
		u.secret.bcrypt = []byte(hash)

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
