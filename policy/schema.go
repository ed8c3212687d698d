package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// This file contains the raw schema: types that mirror the YAML keys one to
// one and remember where each value was written. Each decodes itself from a
// yaml.Node and checks only what it can see alone (kinds, syntax,
// presence). It reports problems with paths relative to itself. compile.go
// then resolves names into runtime types, and validate.go makes the
// cross-checks.

// rawPolicy is the whole policy file, a map with these keys.
type rawPolicy struct {
	// Listeners (key listeners, required) are the addresses iapd accepts
	// on: a non-empty list of listeners.
	Listeners []*rawListener
	// Apps (key apps, required) map an app name to its binding. Names use
	// only letters, digits, '.', '_' and '-'.
	Apps []*rawApp
	// AccessPoints (key access_points, required) map an access point name
	// to the interface and DNS servers it uses. Names as for apps.
	AccessPoints []*rawAccessPoint
	// Destinations (key destinations, optional) map a destination name to
	// its ordered access points. Names as for apps.
	Destinations []*rawDestination
	// Interfaces (key interfaces, optional) map an interface name to what
	// the kernel does not tell about it: its type, cost and whether it is
	// metered. Interfaces not listed have no type, cost 0 and are not
	// metered.
	Interfaces []*rawInterface
	// Routing (key routing, optional) sets the numbers of iapd's own
	// routing tables, firewall marks and rules; all have defaults.
	Routing rawRouting
	// Control (key control, optional) sets the control socket and the
	// HTTP listener for metrics, the status page and the PAC file; see
	// control.go.
	Control rawControl
	// Limits (key limits, optional) bound how long and how much a client
	// may take; all have defaults.
	Limits rawLimits

	listenersPos position // of the listeners value; zero when absent
	pos          position
}

var policyKeys = []string{"listeners", "apps", "access_points", "destinations", "interfaces", "routing", "control", "limits"}

func (p *rawPolicy) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	p.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(policyKeys, ", ")+")") {
		return errs.err()
	}

	p.Routing = rawRouting{Table: defaultTable, Mark: defaultMark, Priority: defaultPriority}
	p.Limits = defaultLimits()
	var hasApps, hasAccessPoints bool
	eachField(&errs, n, policyKeys, func(key string, v *yaml.Node) {
		switch key {
		case "listeners":
			p.listenersPos = posOf(v)
			if !expectKind(&errs, key, v, yaml.SequenceNode, "a list of listeners") {
				return
			}
			if len(v.Content) == 0 {
				errs.add(posOf(v), key, "empty list, at least one listener is required")
			}
			for i, item := range v.Content {
				l := &rawListener{}
				errs.merge(fmt.Sprintf("listeners[%d]", i), l.UnmarshalYAML(resolve(item)))
				p.Listeners = append(p.Listeners, l)
			}
		case "apps":
			hasApps = true
			for _, e := range decodeNamedMap(&errs, key, v, "apps") {
				a := &rawApp{Name: e.Name, NamePos: e.Pos}
				errs.merge(key+"."+e.Name, a.UnmarshalYAML(e.Value))
				p.Apps = append(p.Apps, a)
			}
		case "access_points":
			hasAccessPoints = true
			for _, e := range decodeNamedMap(&errs, key, v, "access points") {
				ap := &rawAccessPoint{Name: e.Name, NamePos: e.Pos}
				errs.merge(key+"."+e.Name, ap.UnmarshalYAML(e.Value))
				p.AccessPoints = append(p.AccessPoints, ap)
			}
		case "destinations":
			for _, e := range decodeNamedMap(&errs, key, v, "destinations") {
				d := &rawDestination{Name: e.Name, NamePos: e.Pos}
				errs.merge(key+"."+e.Name, d.UnmarshalYAML(e.Value))
				p.Destinations = append(p.Destinations, d)
			}
		case "interfaces":
			for _, e := range decodeInterfaceMap(&errs, key, v) {
				ri := &rawInterface{Name: e.Name, NamePos: e.Pos}
				errs.merge(key+"."+e.Name, ri.UnmarshalYAML(e.Value))
				p.Interfaces = append(p.Interfaces, ri)
			}
		case "routing":
			errs.merge(key, p.Routing.UnmarshalYAML(v))
		case "control":
			errs.merge(key, p.Control.UnmarshalYAML(v))
		case "limits":
			errs.merge(key, p.Limits.UnmarshalYAML(v))
		}
	})

	if !p.listenersPos.IsSet() {
		errs.add(p.pos, "", "missing listeners")
	}
	if !hasApps {
		errs.add(p.pos, "", "missing apps")
	}
	if !hasAccessPoints {
		errs.add(p.pos, "", "missing access_points")
	}
	return errs.err()
}

// decodeNamedMap checks that n is a map of named entries and returns them.
// Errors carry key as their path prefix.
func decodeNamedMap(errs *ErrorList, key string, n *yaml.Node, entries string) []namedEntry {
	var local ErrorList
	defer func() { errs.merge(key, local.err()) }()
	if !expectKind(&local, "", n, yaml.MappingNode, "a map of "+entries+" by name") {
		return nil
	}
	return eachNamed(&local, n)
}

// decodeInterfaceMap checks that n is a map keyed by interface names and
// returns its entries. Errors carry key as their path prefix.
func decodeInterfaceMap(errs *ErrorList, key string, n *yaml.Node) []namedEntry {
	var local ErrorList
	defer func() { errs.merge(key, local.err()) }()
	if !expectKind(&local, "", n, yaml.MappingNode, "a map of interfaces by name") {
		return nil
	}

	seen := make(map[string]int, len(n.Content)/2)
	var entries []namedEntry
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode || k.Tag == "!!merge" {
			local.add(posOf(k), "", "keys must be interface names, found %s", describe(k))
			continue
		}
		name := k.Value
		if line, dup := seen[name]; dup {
			local.add(posOf(k), name, "duplicate interface (first at line %d)", line)
			continue
		}
		seen[name] = k.Line
		switch msg := checkInterfaceName(name); {
		case msg != "":
			local.add(posOf(k), name, "invalid interface name %q: %s", name, msg)
		case name == DefaultInterface:
			local.add(posOf(k), name, "\"default\" is not an interface; list the interfaces that hold the default route")
		}
		if isNull(v) {
			v = &yaml.Node{Kind: yaml.MappingNode, Line: k.Line, Column: k.Column}
		}
		entries = append(entries, namedEntry{Name: name, Pos: posOf(k), Value: v})
	}
	return entries
}

// rawListener is one entry of listeners.
type rawListener struct {
	// Listen (key listen, required) is the TCP address to accept on, as
	// "host:port". host is an IP literal, "localhost" (127.0.0.1) or empty
	// for all addresses; port is 0 to 65535, where 0 lets the kernel pick
	// one. Two listeners must not share a host and non-zero port.
	Listen text
	// Protocol (key protocol, optional) is socks5, http or mixed. A mixed
	// listener recognises SOCKS5 or HTTP by the first byte the client
	// sends. Default mixed.
	Protocol text
	// App (key app) names the app of every client of this listener: the
	// port identifies the app. Exactly one of app and users is required.
	App text
	// Users (key users) identify the app by the credentials a client
	// sends: a non-empty list of users. Exactly one of app and users is
	// required.
	Users []*rawUser
	// MaxConnections (key max_connections, optional) caps the client
	// connections the listener holds at once, from accept to close, an
	// integer from 1 to 1000000. A client beyond it is closed at accept.
	// Default 1024.
	MaxConnections int64
	// AllowClients (key allow_clients, optional) lists the client
	// addresses that may connect, as prefixes (192.0.2.0/24,
	// 2001:db8::/32) or single addresses. A client outside them is closed
	// at accept. Default: every client. A listener on an address other
	// than loopback needs either users or allow_clients, so that it never
	// becomes an open proxy by accident.
	AllowClients []prefix

	listenAddr      netip.Addr // parsed host; invalid for an empty host
	listenPort      uint16
	listenOK        bool // Listen parsed
	protocol        Protocol
	usersPos        position // of the users value; zero when absent
	allowClientsPos position // of the allow_clients value; zero when absent
	pos             position
}

// prefix is one valid entry of allow_clients.
type prefix struct {
	Prefix netip.Prefix
	Pos    position
}

// defaultListenerConnections is the default max_connections of a
// listener. An upstream connection costs two file descriptors, so 1024
// clients stay well inside the usual limit of a service (LimitNOFILE).
const defaultListenerConnections = 1024

// maxConnectionsLimit bounds every max_connections, to catch a stray digit.
const maxConnectionsLimit = 1000000

var listenerKeys = []string{"listen", "protocol", "app", "users", "max_connections", "allow_clients"}

func (l *rawListener) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	l.pos = posOf(n)
	l.protocol = ProtocolMixed
	l.MaxConnections = defaultListenerConnections
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(listenerKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, listenerKeys, func(key string, v *yaml.Node) {
		switch key {
		case "listen":
			l.Listen = decodeText(&errs, key, v)
			if l.Listen.IsSet() {
				l.listenAddr, l.listenPort, l.listenOK = parseListen(&errs, key, l.Listen)
			}
		case "protocol":
			l.Protocol = decodeText(&errs, key, v)
			if l.Protocol.IsSet() {
				l.protocol = parseProtocol(&errs, key, l.Protocol)
			}
		case "app":
			l.App = decodeText(&errs, key, v)
		case "users":
			l.usersPos = posOf(v)
			if !expectKind(&errs, key, v, yaml.SequenceNode, "a list of users") {
				return
			}
			if len(v.Content) == 0 {
				errs.add(posOf(v), key, "empty list, at least one user is required")
			}
			for i, item := range v.Content {
				u := &rawUser{}
				errs.merge(fmt.Sprintf("users[%d]", i), u.UnmarshalYAML(resolve(item)))
				l.Users = append(l.Users, u)
			}
		case "max_connections":
			if v, ok := decodeCount(&errs, key, v); ok {
				l.MaxConnections = v
			}
		case "allow_clients":
			l.allowClientsPos = posOf(v)
			if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
				errs.add(posOf(v), key, "empty list would refuse every client; leave allow_clients out to allow all")
			}
			l.AllowClients = decodePrefixList(&errs, key, v)
		}
	})

	if !l.Listen.IsSet() && !hasError(errs, "listen") {
		errs.add(l.pos, "", "missing listen")
	}
	switch {
	case l.App.IsSet() && l.usersPos.IsSet():
		errs.add(later(l.App.Pos, l.usersPos), "", "both app and users given, a listener needs exactly one")
	case !l.App.IsSet() && !l.usersPos.IsSet() && !hasError(errs, "app") && !hasError(errs, "users"):
		errs.add(l.pos, "", "missing app or users (the port identifies the app, or credentials do)")
	}
	return errs.err()
}

// hasError reports whether errs already holds a problem at path, so that
// a value of the wrong kind is not reported a second time as missing.
func hasError(errs ErrorList, path string) bool {
	for _, e := range errs {
		if e.Path == path {
			return true
		}
	}
	return false
}

// later returns whichever of a and b comes later in the file.
func later(a, b position) position {
	if b.Line > a.Line || b.Line == a.Line && b.Column > a.Column {
		return b
	}
	return a
}

// rawUser is one entry of a listener's users.
type rawUser struct {
	// Name (key name, required) is the user name a client sends: 1 to 255
	// bytes (the SOCKS5 limit), unique within the listener. It must not
	// contain ':', because HTTP Basic authentication splits at the first
	// colon, nor '+', which is reserved for choosing an access point per
	// connection, nor spaces or control characters.
	Name text
	// PasswordHash (key password_hash) is a bcrypt hash of the password,
	// as made by htpasswd -B or golang.org/x/crypto/bcrypt; quote it in
	// YAML. Exactly one of password_hash and password_env is required.
	PasswordHash text
	// PasswordEnv (key password_env) names an environment variable that
	// holds the plain password. It must be set and non-empty when the
	// policy is loaded; the value is read once, at load. Exactly one of
	// password_hash and password_env is required.
	PasswordEnv text
	// App (key app, required) names the app that these credentials
	// identify.
	App text

	pos position
}

var userKeys = []string{"name", "password_hash", "password_env", "app"}

func (u *rawUser) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	u.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(userKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, userKeys, func(key string, v *yaml.Node) {
		switch key {
		case "name":
			u.Name = decodeText(&errs, key, v)
			if u.Name.IsSet() {
				if msg := checkUserName(u.Name.Value); msg != "" {
					errs.add(u.Name.Pos, key, "invalid user name %q: %s", u.Name.Value, msg)
				}
			}
		case "password_hash":
			u.PasswordHash = decodeText(&errs, key, v)
		case "password_env":
			u.PasswordEnv = decodeText(&errs, key, v)
			if u.PasswordEnv.IsSet() && !isEnvName(u.PasswordEnv.Value) {
				errs.add(u.PasswordEnv.Pos, key, "invalid environment variable name %q", u.PasswordEnv.Value)
			}
		case "app":
			u.App = decodeText(&errs, key, v)
		}
	})

	if !u.Name.IsSet() && !hasError(errs, "name") {
		errs.add(u.pos, "", "missing name")
	}
	switch {
	case u.PasswordHash.IsSet() && u.PasswordEnv.IsSet():
		errs.add(later(u.PasswordHash.Pos, u.PasswordEnv.Pos), "", "both password_hash and password_env given, use exactly one")
	case !u.PasswordHash.IsSet() && !u.PasswordEnv.IsSet() && !hasError(errs, "password_hash") && !hasError(errs, "password_env"):
		errs.add(u.pos, "", "missing password_hash or password_env")
	}
	if !u.App.IsSet() && !hasError(errs, "app") {
		errs.add(u.pos, "", "missing app")
	}
	return errs.err()
}

// rawApp is one entry of apps.
type rawApp struct {
	Name    string
	NamePos position

	// AccessPoint (key access_point) binds the app to one access point: a
	// destination of one, named after the access point. Exactly one of
	// access_point and destination is required.
	AccessPoint text
	// Destination (key destination) names the destination whose access
	// points the app's connections use. Exactly one of access_point and
	// destination is required.
	Destination text
	// Routes (key routes, optional) send some targets elsewhere: a list of
	// routes, tried in order, the first match applying. Targets that no
	// route matches use access_point or destination. See rawRoute.
	Routes []*rawRoute
	// AllowOverride (key allow_override, optional) lets a client choose
	// an access point or destination for one connection by adding
	// "+NAME" to its user name (dev+cell). true allows any access point
	// or destination of the policy, a list allows the names listed.
	// Routes still apply first: a choice may only narrow a routed target
	// to one access point of the route's destination. Default false.
	AllowOverride []text
	// DNSListen (key dns_listen, optional) is a loopback address,
	// "host:port" with a port from 1 to 65535, where iapd answers DNS
	// queries over UDP and TCP for this app: each name is resolved by the
	// access points its routes choose. For programs that resolve names
	// before they connect. Default none.
	DNSListen text
	// Require (key require, optional) narrows the access points that may
	// carry the app's connections by the facts of the interfaces section:
	// types and metered. When no usable access point meets it, the app's
	// connections are refused. Default: every access point.
	Require rawRequirement
	// Priority (key priority, optional) ranks the app when an access point
	// with max_connections is full: a connection of a higher priority app
	// closes one of the lowest priority to make room. An integer from
	// -1000 to 1000, higher wins. Default 0.
	Priority int64
	// MaxConnections (key max_connections, optional) caps the app's
	// upstream connections at once, over all listeners and access points,
	// an integer from 1 to 1000000. A connection beyond it is refused.
	// Default: no cap of its own.
	MaxConnections int64
	// AllowLocalTargets (key allow_local_targets, optional) lets the app
	// reach targets on loopback, link-local and the host's own addresses,
	// names that resolve to them included. Default false: such targets are
	// refused, so that a proxy client cannot reach services that listen
	// only locally.
	AllowLocalTargets bool

	allowAll        bool     // allow_override: true
	allowPos        position // of the allow_override value; zero when absent
	dnsListenAddr   netip.AddrPort
	dnsListenParsed bool
	pos             position
}

const (
	minPriority = -1000
	maxPriority = 1000
)

var appKeys = []string{"access_point", "destination", "routes", "allow_override", "dns_listen", "require", "priority", "max_connections", "allow_local_targets"}

func (a *rawApp) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	a.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(appKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, appKeys, func(key string, v *yaml.Node) {
		switch key {
		case "access_point":
			a.AccessPoint = decodeText(&errs, key, v)
		case "destination":
			a.Destination = decodeText(&errs, key, v)
		case "routes":
			if !expectKind(&errs, key, v, yaml.SequenceNode, "a list of routes") {
				return
			}
			for i, item := range v.Content {
				r := &rawRoute{Index: i}
				errs.merge(fmt.Sprintf("routes[%d]", i), r.UnmarshalYAML(resolve(item)))
				a.Routes = append(a.Routes, r)
			}
		case "allow_override":
			a.allowPos = posOf(v)
			if v.Kind == yaml.ScalarNode && v.Tag == "!!bool" {
				a.allowAll = v.Value == "true" || v.Value == "True" || v.Value == "TRUE"
				return
			}
			if v.Kind != yaml.SequenceNode {
				errs.add(posOf(v), key, "must be true, false or a list of access point and destination names, found %s", describe(v))
				return
			}
			a.AllowOverride = decodeTextList(&errs, key, v, "access point and destination names")
		case "dns_listen":
			a.DNSListen = decodeText(&errs, key, v)
			if a.DNSListen.IsSet() {
				a.dnsListenAddr, a.dnsListenParsed = parseDNSListen(&errs, key, a.DNSListen)
			}
		case "require":
			errs.merge(key, a.Require.UnmarshalYAML(v))
		case "priority":
			if value, ok := decodeIntIn(&errs, key, v, minPriority, maxPriority); ok {
				a.Priority = value
			}
		case "max_connections":
			if v, ok := decodeCount(&errs, key, v); ok {
				a.MaxConnections = v
			}
		case "allow_local_targets":
			a.AllowLocalTargets, _, _ = decodeBool(&errs, key, v)
		}
	})

	switch {
	case a.AccessPoint.IsSet() && a.Destination.IsSet():
		errs.add(later(a.AccessPoint.Pos, a.Destination.Pos), "", "both access_point and destination given, an app needs exactly one")
	case !a.AccessPoint.IsSet() && !a.Destination.IsSet() && len(errs) == 0:
		errs.add(a.pos, "", "missing access_point or destination")
	}
	return errs.err()
}

// rawAccessPoint is one entry of access_points.
type rawAccessPoint struct {
	Name    string
	NamePos position

	// Interface (key interface, required) is the network interface that
	// connections and DNS queries leave through. It is a Linux interface
	// name (1 to 15 bytes, no '/', ':' or whitespace, not "." or ".."), or
	// "default" for whichever interface holds the default route when
	// dialling, with no binding.
	Interface text
	// DNS (key dns, required unless proxy is given) lists the DNS servers
	// to ask, in order: each an IP address with an optional port
	// (192.0.2.53, 2001:db8::53, 192.0.2.54:5353, [2001:db8::53]:53), port
	// 53 unless given. An IPv6 link-local server takes its zone from a
	// named interface (fe80::1%wlan0). A loopback server is allowed only
	// with interface: default. The string "auto" uses the servers and
	// search domains that the system has for the interface
	// (systemd-resolved, NetworkManager, or the lease files of dhclient
	// and dhcpcd), followed as they change; it needs a named interface.
	// The string "system" uses the host's resolver and is allowed only
	// with interface: default.
	DNS []dnsServer
	// Search (key search, optional) lists search domains appended to
	// single-label names, like corp.example. A trailing dot is dropped.
	// Not allowed with dns: system, whose search list comes from the host.
	// With dns: auto it replaces the search domains found for the link.
	Search []text
	// DNSTimeouts (key dns_timeouts, optional) are the waits before asking
	// the next server, as Go durations (500ms, 2s), each above zero.
	// Default [1s, 2s, 4s, 8s]. Not allowed with dns: system.
	DNSTimeouts []duration
	// Gateway (key gateway, optional) lists the next-hop routers on the
	// interface, at most one IPv4 and one IPv6 address. Default: the
	// gateway of the routes the system already has on the interface. Not
	// allowed with interface: default.
	Gateway []address
	// Source (key source, optional) lists the source addresses for
	// upstream connections, at most one IPv4 and one IPv6 address. Default:
	// an address of the interface. Not allowed with interface: default.
	Source []address
	// Proxy (key proxy, optional) is a gateway proxy that every
	// connection of this access point goes through, reached out of its
	// interface. dns may be left out then, because target names go to the
	// proxy unresolved; it is needed when the proxy's host is a name.
	// See rawProxy.
	Proxy *rawProxy
	// Probe (key probe, optional) checks that the access point reaches its
	// network; while it fails, the access point is unusable. Default: no
	// probe, so link state alone decides.
	Probe *rawProbe
	// MaxConnections (key max_connections, optional) caps the upstream
	// connections through this access point at once, an integer from 1 to
	// 1000000. When it is full, a connection of an app with a higher
	// priority closes one of the lowest priority; otherwise the next
	// access point of the destination is tried. Default: no cap.
	MaxConnections int64

	dnsSystem   position // of dns: system; zero otherwise
	dnsAuto     position // of dns: auto; zero otherwise
	dnsPos      position // of the dns value; zero when absent
	timeoutsPos position // of the dns_timeouts value; zero when absent
	searchPos   position // of the search value; zero when absent
	gatewayPos  position // of the gateway value; zero when absent
	sourcePos   position // of the source value; zero when absent
	pos         position
}

// dnsServer is one valid entry of an access point's dns list.
type dnsServer struct {
	Addr  netip.AddrPort
	Text  string // as written
	Index int    // in the dns list
	Pos   position
}

// duration is one entry of dns_timeouts.
type duration struct {
	Value time.Duration
	Pos   position
}

// address is one valid entry of gateway or source.
type address struct {
	Addr  netip.Addr
	Index int // in the list
	Pos   position
}

var accessPointKeys = []string{"interface", "dns", "search", "dns_timeouts", "gateway", "source", "proxy", "probe", "max_connections"}

func (ap *rawAccessPoint) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	ap.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(accessPointKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, accessPointKeys, func(key string, v *yaml.Node) {
		switch key {
		case "interface":
			ap.Interface = decodeText(&errs, key, v)
			if ap.Interface.IsSet() {
				if msg := checkInterfaceName(ap.Interface.Value); msg != "" {
					errs.add(ap.Interface.Pos, key, "invalid interface name %q: %s", ap.Interface.Value, msg)
				}
			}
		case "dns":
			ap.dnsPos = posOf(v)
			if v.Kind == yaml.ScalarNode && v.Value == "system" {
				ap.dnsSystem = posOf(v)
				return
			}
			if v.Kind == yaml.ScalarNode && v.Value == "auto" {
				ap.dnsAuto = posOf(v)
				return
			}
			if v.Kind != yaml.SequenceNode {
				errs.add(posOf(v), key, "must be a list of server addresses, \"auto\" or \"system\", found %s", describe(v))
				return
			}
			if len(v.Content) == 0 {
				errs.add(posOf(v), key, "empty list, at least one server is required")
			}
			for i, t := range decodeTextList(&errs, key, v, "server addresses") {
				if !t.IsSet() {
					continue
				}
				if s, ok := parseDNSServer(&errs, key, i, t); ok {
					ap.DNS = append(ap.DNS, s)
				}
			}
		case "search":
			ap.searchPos = posOf(v)
			for i, t := range decodeTextList(&errs, key, v, "domain names") {
				if !t.IsSet() {
					continue
				}
				name := strings.TrimSuffix(t.Value, ".")
				if msg := checkDomainName(name); msg != "" {
					errs.add(t.Pos, fmt.Sprintf("%s[%d]", key, i), "invalid domain name %q: %s", t.Value, msg)
					continue
				}
				ap.Search = append(ap.Search, text{Value: name, Pos: t.Pos})
			}
		case "dns_timeouts":
			ap.timeoutsPos = posOf(v)
			list := decodeTextList(&errs, key, v, "durations")
			if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
				errs.add(posOf(v), key, "empty list; leave dns_timeouts out for the default 1s, 2s, 4s, 8s")
			}
			for i, t := range list {
				if !t.IsSet() {
					continue
				}
				d, err := time.ParseDuration(t.Value)
				switch {
				case err != nil:
					errs.add(t.Pos, fmt.Sprintf("%s[%d]", key, i), "invalid duration %q: use a number with a unit, like 500ms or 2s", t.Value)
				case d <= 0:
					errs.add(t.Pos, fmt.Sprintf("%s[%d]", key, i), "duration %s must be above zero", t.Value)
				default:
					ap.DNSTimeouts = append(ap.DNSTimeouts, duration{Value: d, Pos: t.Pos})
				}
			}
		case "gateway":
			ap.gatewayPos = posOf(v)
			ap.Gateway = decodeAddressList(&errs, key, v)
		case "source":
			ap.sourcePos = posOf(v)
			ap.Source = decodeAddressList(&errs, key, v)
		case "proxy":
			ap.Proxy = &rawProxy{}
			errs.merge(key, ap.Proxy.UnmarshalYAML(v))
		case "probe":
			ap.Probe = &rawProbe{}
			errs.merge(key, ap.Probe.UnmarshalYAML(v))
		case "max_connections":
			if v, ok := decodeCount(&errs, key, v); ok {
				ap.MaxConnections = v
			}
		}
	})

	if !ap.Interface.IsSet() && !hasError(errs, "interface") {
		errs.add(ap.pos, "", "missing interface")
	}
	if !ap.dnsPos.IsSet() && ap.Proxy == nil {
		errs.add(ap.pos, "", "missing dns (a list of server addresses, \"auto\", or \"system\" with interface: default)")
	}
	return errs.err()
}

// rawDestination is one entry of destinations.
type rawDestination struct {
	Name    string
	NamePos position

	// AccessPoints (key access_points, required) lists the access points
	// that reach this destination's network, in order of preference:
	// non-empty, each defined under access_points and listed once.
	AccessPoints []text
	// Select (key select, optional) orders the usable access points:
	// priority (the order of access_points), cost (lowest interface cost
	// first), latency (lowest probe latency first), round-robin (each new
	// connection starts at the next one) or race (dial the first, start
	// the next after race_delay, keep the first that connects). Default
	// priority.
	Select text
	// Tolerance (key tolerance, optional) is how close to the lowest
	// latency another access point's latency must be to count as equal,
	// so that jitter does not move traffic. Only with select: latency.
	// Default 20ms.
	Tolerance duration
	// RaceDelay (key race_delay, optional) is how long a dial waits for
	// one access point before it starts the next. Only with select: race.
	// Default 250ms.
	RaceDelay duration
	// HoldDown (key hold_down, optional) is how long a preferred access
	// point must stay usable again before new connections go back to it,
	// so that a flapping link does not bounce traffic. 0 goes back at
	// once. Default 5s.
	HoldDown duration
	// OnLost (key on_lost, optional) is what happens to the connections
	// open on an access point that stops being usable: close (reset them
	// at once, so that applications reconnect) or keep. Default close.
	OnLost text
	// OnBetter (key on_better, optional) is what happens to the
	// connections open on other access points when the destination goes
	// back to a better one: keep, or close (so that applications
	// reconnect through the better one). Not with select: round-robin,
	// which has no better access point. Default keep.
	OnBetter text

	selection       Selection
	onLost          OnLost
	onBetter        OnBetter
	accessPointsPos position // of the access_points value; zero when absent
	pos             position
}

var destinationKeys = []string{"access_points", "select", "tolerance", "race_delay", "hold_down", "on_lost", "on_better"}

func (d *rawDestination) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	d.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(destinationKeys, ", ")+")") {
		return errs.err()
	}

	d.Tolerance.Value = DefaultTolerance
	d.RaceDelay.Value = DefaultRaceDelay
	d.HoldDown.Value = DefaultHoldDown
	eachField(&errs, n, destinationKeys, func(key string, v *yaml.Node) {
		switch key {
		case "access_points":
			d.accessPointsPos = posOf(v)
			d.AccessPoints = decodeTextList(&errs, key, v, "access point names")
			if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
				errs.add(posOf(v), key, "empty list, a destination needs at least one access point")
			}
		case "select":
			d.Select = decodeText(&errs, key, v)
			if d.Select.IsSet() {
				d.selection = parseSelection(&errs, key, d.Select)
			}
		case "tolerance", "race_delay", "hold_down":
			value, t, ok := decodeDuration(&errs, key, v)
			if !ok {
				return
			}
			dur := duration{Value: value, Pos: t.Pos}
			switch key {
			case "tolerance":
				d.Tolerance = dur
			case "race_delay":
				if value == 0 {
					errs.add(t.Pos, key, "race_delay must be above zero; use select: priority to dial one access point at a time")
					return
				}
				d.RaceDelay = dur
			default:
				d.HoldDown = dur
			}
		case "on_lost":
			d.OnLost = decodeText(&errs, key, v)
			switch d.OnLost.Value {
			case "", "close":
			case "keep":
				d.onLost = OnLostKeep
			default:
				errs.add(d.OnLost.Pos, key, "invalid value %q: must be close or keep", d.OnLost.Value)
			}
		case "on_better":
			d.OnBetter = decodeText(&errs, key, v)
			switch d.OnBetter.Value {
			case "", "keep":
			case "close":
				d.onBetter = OnBetterClose
			default:
				errs.add(d.OnBetter.Pos, key, "invalid value %q: must be keep or close", d.OnBetter.Value)
			}
		}
	})
	switch {
	case d.Tolerance.Pos.IsSet() && d.selection != SelectLatency:
		errs.add(d.Tolerance.Pos, "tolerance", "only with select: latency")
	case d.RaceDelay.Pos.IsSet() && d.selection != SelectRace:
		errs.add(d.RaceDelay.Pos, "race_delay", "only with select: race")
	}
	if d.onBetter == OnBetterClose && d.selection == SelectRoundRobin {
		errs.add(d.OnBetter.Pos, "on_better", "not with select: round-robin, which spreads connections and has no better access point")
	}

	if !d.accessPointsPos.IsSet() {
		errs.add(d.pos, "", "missing access_points (a destination needs at least one)")
	}
	return errs.err()
}

// parseSelection parses a select value, adding an error at t for an
// unknown rule.
func parseSelection(errs *ErrorList, path string, t text) Selection {
	for i, name := range selectionNames {
		if t.Value == name {
			return Selection(i)
		}
	}
	errs.add(t.Pos, path, "invalid rule %q: must be priority, cost, latency, round-robin or race", t.Value)
	return SelectPriority
}

// Routing defaults. The numbers are arbitrary but fixed, so that tables and
// rules left behind by a crash are recognisable; 18100 is far from the
// numbers that distributions and VPN clients commonly use.
const (
	defaultTable    = 18100
	defaultMark     = 0x1a900
	defaultPriority = 18100
)

// rawRouting is the routing map. Access point i, counting every access
// point in file order from 0, uses table table+i and mark mark+i; see
// ip-rule(8) and ip-route(8).
type rawRouting struct {
	// Table (key table, optional) is the first routing table number, from
	// 1 to 2147483647. No access point's table may be 253, 254 or 255
	// (the kernel's default, main and local tables). Default 18100.
	Table int64
	// Mark (key mark, optional) is the first firewall mark (SO_MARK, see
	// socket(7)), an integer above zero that may be written in hex
	// (0x1a900). Every access point's mark must fit 32 bits. Default
	// 0x1a900.
	Mark int64
	// Priority (key priority, optional) is the priority of iapd's rules
	// that select an access point's table, from 1 to 32764. The rules that
	// stop marked sockets from falling through to other tables sit at
	// priority+1, so both come before the main table's rule at
	// 32766. Default 18100.
	Priority int64

	tablePos position // zero when absent
	markPos  position // zero when absent
}

var routingKeys = []string{"table", "mark", "priority"}

func (r *rawRouting) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(routingKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, routingKeys, func(key string, v *yaml.Node) {
		value, t, ok := decodeInt(&errs, key, v)
		if !ok {
			return
		}
		switch key {
		case "table":
			if value < 1 || value > 1<<31-1 {
				errs.add(t.Pos, key, "table %s out of range 1 to 2147483647", t.Value)
				return
			}
			r.Table, r.tablePos = value, t.Pos
		case "mark":
			if value < 1 || value > 1<<32-1 {
				errs.add(t.Pos, key, "mark %s out of range 0x1 to 0xffffffff", t.Value)
				return
			}
			r.Mark, r.markPos = value, t.Pos
		case "priority":
			if value < 1 || value > 32764 {
				errs.add(t.Pos, key, "priority %s out of range 1 to 32764 (iapd uses it and the next number, and the main table's rule is at 32766)", t.Value)
				return
			}
			r.Priority = value
		}
	})
	return errs.err()
}

// Limit defaults. See rawLimits for what each bounds.
const (
	defaultHandshakeTimeout = 10 * time.Second
	defaultDialTimeout      = 30 * time.Second
	// An hour outlasts IMAP IDLE, which clients renew every 29 minutes
	// (RFC 2177), and reclaims tunnels whose clients went away quietly.
	defaultIdleTimeout      = time.Hour
	defaultMaxHeaderBytes   = 64 << 10
	defaultAuthFailureDelay = 250 * time.Millisecond

	minMaxHeaderBytes   = 1 << 10
	maxMaxHeaderBytes   = 1 << 20
	maxAuthFailureDelay = 10 * time.Second
)

func defaultLimits() rawLimits {
	return rawLimits{
		HandshakeTimeout: defaultHandshakeTimeout,
		DialTimeout:      defaultDialTimeout,
		IdleTimeout:      defaultIdleTimeout,
		MaxHeaderBytes:   defaultMaxHeaderBytes,
		AuthFailureDelay: defaultAuthFailureDelay,
	}
}

// rawLimits is the limits map: bounds on what one client may take. Each
// key is optional.
type rawLimits struct {
	// HandshakeTimeout (key handshake_timeout) bounds a client's SOCKS5
	// negotiation, or its HTTP request line and headers, from accept until
	// the upstream is dialled, against clients that send slowly or not at
	// all. A Go duration above zero. Default 10s.
	HandshakeTimeout time.Duration
	// DialTimeout (key dial_timeout) bounds the dial of one connection,
	// name resolution included, over all access points tried. A Go
	// duration above zero. Default 30s.
	DialTimeout time.Duration
	// IdleTimeout (key idle_timeout) closes a tunnel (SOCKS5 CONNECT or
	// HTTP CONNECT) and a pooled upstream connection on which no byte has
	// moved either way for this long. A Go duration; 0 keeps idle tunnels
	// open. Default 1h.
	IdleTimeout time.Duration
	// MaxHeaderBytes (key max_header_bytes) caps an HTTP request line and
	// its headers, in bytes, from 1024 to 1048576. A larger request gets
	// 431 Request Header Fields Too Large. Default 65536.
	MaxHeaderBytes int64
	// AuthFailureDelay (key auth_failure_delay) slows down guessing:
	// after a failed login from a client address, that address's next
	// attempts wait this long before they are checked, doubling with each
	// further failure up to 16 times the value. A Go duration up to 10s;
	// 0 turns the delay off. Default 250ms.
	AuthFailureDelay time.Duration
}

var limitsKeys = []string{"handshake_timeout", "dial_timeout", "idle_timeout", "max_header_bytes", "auth_failure_delay"}

// decodePositiveDuration decodes a duration that must be above zero.
func decodePositiveDuration(errs *ErrorList, path string, n *yaml.Node) (time.Duration, bool) {
	d, t, ok := decodeDuration(errs, path, n)
	if ok && d == 0 {
		errs.add(t.Pos, path, "duration %s must be above zero", t.Value)
		return 0, false
	}
	return d, ok
}

func (l *rawLimits) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(limitsKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, limitsKeys, func(key string, v *yaml.Node) {
		switch key {
		case "handshake_timeout":
			if d, ok := decodePositiveDuration(&errs, key, v); ok {
				l.HandshakeTimeout = d
			}
		case "dial_timeout":
			if d, ok := decodePositiveDuration(&errs, key, v); ok {
				l.DialTimeout = d
			}
		case "idle_timeout":
			if d, _, ok := decodeDuration(&errs, key, v); ok {
				l.IdleTimeout = d
			}
		case "max_header_bytes":
			if value, ok := decodeIntIn(&errs, key, v, minMaxHeaderBytes, maxMaxHeaderBytes); ok {
				l.MaxHeaderBytes = value
			}
		case "auth_failure_delay":
			d, _, ok := decodeDuration(&errs, key, v)
			if !ok {
				return
			}
			if d > maxAuthFailureDelay {
				errs.add(posOf(v), key, "auth_failure_delay %s is above the maximum of %s", v.Value, maxAuthFailureDelay)
				return
			}
			l.AuthFailureDelay = d
		}
	})
	return errs.err()
}
