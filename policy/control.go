package policy

import (
	"fmt"
	"io/fs"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// This file contains the control section of the policy: where the control
// API listens, and the optional HTTP listener for metrics, the status page
// and the PAC file.

// DefaultSocketMode is the permission of the control socket when the
// policy sets none: owner and group may read and write, others nothing.
const DefaultSocketMode fs.FileMode = 0o660

// Control holds the settings of iapd's control API and its optional HTTP
// listener.
type Control struct {
	// Socket is the path of the control API's Unix socket; empty means the
	// default of the running process (see the admin package).
	Socket     string
	SocketMode fs.FileMode
	// HTTP is the host:port of the HTTP listener that serves /metrics, the
	// status page and the PAC file; empty when there is none.
	HTTP string
	// PAC lists the rules of the PAC file in order; the first match wins
	// and a host that no rule matches goes DIRECT.
	PAC []PACRule
}

// PACRule sends the hosts matching any of its patterns to the listener of
// one app, or straight to the target.
type PACRule struct {
	// Hosts are the patterns as written: "*" for every host, a shell
	// pattern with '*' and '?' ("*.corp.example"), an exact host name, or
	// an IP prefix ("10.0.0.0/8") that matches address literals only.
	Hosts []string
	// Direct is set for a rule that bypasses iapd; App and Listener are
	// then nil.
	Direct   bool
	App      *App
	Listener *Listener // the listener whose port identifies App
}

// rawControl is the control map.
type rawControl struct {
	// Socket (key socket, optional) is the absolute path of the control
	// API's Unix socket. Default: $RUNTIME_DIRECTORY/iapd.sock under
	// systemd, /run/iapd/iapd.sock as root, $XDG_RUNTIME_DIR/iapd/iapd.sock
	// otherwise. A reload cannot move it.
	Socket text
	// SocketMode (key socket_mode, optional) is the socket's permission
	// in octal, like 0660 or "0600". Default 0660.
	SocketMode text
	// HTTP (key http, optional) is the host:port of the HTTP listener for
	// /metrics, the status page and /proxy.pac. host is an IP address or
	// "localhost"; it must be a loopback address unless http_remote is
	// true. No HTTP listener when absent.
	HTTP text
	// HTTPRemote (key http_remote, optional) allows a non-loopback http
	// address. The status page lists the target of every connection, so
	// this exposes what every app talks to. Default false.
	HTTPRemote text
	// PAC (key pac, optional) lists the rules of /proxy.pac, first match
	// first; needs http.
	PAC []*rawPACRule

	httpAddr netip.Addr
	pacPos   position
	pos      position
}

// rawPACRule is one entry of control.pac.
type rawPACRule struct {
	// Hosts (key hosts, required) lists host patterns: "*", a shell
	// pattern with '*' and '?' (*.corp.example), an exact host name, or an
	// IP prefix (10.0.0.0/8, 2001:db8::/32) that matches address literals.
	// The PAC file never resolves a name, so that the browser does not ask
	// its own DNS server about hosts that iapd resolves.
	Hosts []text
	// App (key app) names the app whose listener takes these hosts. The
	// listener must identify the app by its port (app:, not users:),
	// because a browser using a PAC file sends no proxy credentials.
	// Exactly one of app and direct is required.
	App text
	// Direct (key direct) set to true sends these hosts to the target
	// without iapd. Exactly one of app and direct is required.
	Direct text

	pos position
}

var (
	controlKeys = []string{"socket", "socket_mode", "http", "http_remote", "pac"}
	pacRuleKeys = []string{"hosts", "app", "direct"}
)

func (c *rawControl) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	c.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(controlKeys, ", ")+")") {
		return errs.err()
	}

	eachField(&errs, n, controlKeys, func(key string, v *yaml.Node) {
		switch key {
		case "socket":
			c.Socket = decodeText(&errs, key, v)
			if c.Socket.IsSet() && !filepath.IsAbs(c.Socket.Value) {
				errs.add(c.Socket.Pos, key, "socket path %q must be absolute", c.Socket.Value)
			}
		case "socket_mode":
			c.SocketMode = decodeText(&errs, key, v)
			if c.SocketMode.IsSet() {
				if _, ok := parseSocketMode(c.SocketMode.Value); !ok {
					errs.add(c.SocketMode.Pos, key, "invalid mode %q: want octal permission bits, like 0660", c.SocketMode.Value)
				}
			}
		case "http":
			c.HTTP = decodeText(&errs, key, v)
			if c.HTTP.IsSet() {
				var ok bool
				c.httpAddr, _, ok = parseListen(&errs, key, c.HTTP)
				if ok && !c.httpAddr.IsValid() {
					errs.add(c.HTTP.Pos, key, "invalid address %q: give the host, like 127.0.0.1:9180", c.HTTP.Value)
				}
			}
		case "http_remote":
			c.HTTPRemote = decodeText(&errs, key, v)
			if c.HTTPRemote.IsSet() && c.HTTPRemote.Value != "true" && c.HTTPRemote.Value != "false" {
				errs.add(c.HTTPRemote.Pos, key, "must be true or false, found %q", c.HTTPRemote.Value)
			}
		case "pac":
			c.pacPos = posOf(v)
			if !expectKind(&errs, key, v, yaml.SequenceNode, "a list of rules") {
				return
			}
			for i, item := range v.Content {
				r := &rawPACRule{}
				errs.merge(fmt.Sprintf("pac[%d]", i), r.UnmarshalYAML(resolve(item)))
				c.PAC = append(c.PAC, r)
			}
		}
	})

	if c.httpAddr.IsValid() && !c.httpAddr.IsLoopback() && c.HTTPRemote.Value != "true" {
		errs.add(c.HTTP.Pos, "http",
			"%s is not a loopback address: the status page lists the target of every connection; use 127.0.0.1, or set http_remote: true", c.HTTP.Value)
	}
	if c.pacPos.IsSet() && !c.HTTP.IsSet() && !hasError(errs, "http") {
		errs.add(c.pacPos, "pac", "the PAC file is served on the HTTP listener: set http as well")
	}
	return errs.err()
}

func (r *rawPACRule) UnmarshalYAML(n *yaml.Node) error {
	var errs ErrorList
	r.pos = posOf(n)
	if !expectKind(&errs, "", n, yaml.MappingNode, "a map (keys: "+strings.Join(pacRuleKeys, ", ")+")") {
		return errs.err()
	}

	var hostsPos position
	eachField(&errs, n, pacRuleKeys, func(key string, v *yaml.Node) {
		switch key {
		case "hosts":
			hostsPos = posOf(v)
			r.Hosts = decodeTextList(&errs, key, v, "host patterns")
			if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
				errs.add(posOf(v), key, "empty list, a rule needs at least one host pattern")
			}
			for i, t := range r.Hosts {
				if !t.IsSet() {
					continue
				}
				if msg := checkHostPattern(t.Value); msg != "" {
					errs.add(t.Pos, fmt.Sprintf("%s[%d]", key, i), "invalid host pattern %q: %s", t.Value, msg)
				}
			}
		case "app":
			r.App = decodeText(&errs, key, v)
		case "direct":
			r.Direct = decodeText(&errs, key, v)
			if r.Direct.IsSet() && r.Direct.Value != "true" {
				errs.add(r.Direct.Pos, key, "must be true, found %q; leave direct out for a rule with app", r.Direct.Value)
			}
		}
	})

	if !hostsPos.IsSet() && !hasError(errs, "hosts") {
		errs.add(r.pos, "", "missing hosts")
	}
	switch {
	case r.App.IsSet() && r.Direct.IsSet():
		errs.add(later(r.App.Pos, r.Direct.Pos), "", "both app and direct given, a rule needs exactly one")
	case !r.App.IsSet() && !r.Direct.IsSet() && !hasError(errs, "app") && !hasError(errs, "direct"):
		errs.add(r.pos, "", "missing app or direct")
	}
	return errs.err()
}

// parseSocketMode parses octal permission bits, with or without a leading
// 0 or 0o.
func parseSocketMode(s string) (fs.FileMode, bool) {
	s = strings.TrimPrefix(strings.TrimPrefix(s, "0o"), "0O")
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || v > 0o777 {
		return 0, false
	}
	return fs.FileMode(v), true
}

// checkHostPattern returns why p cannot be a PAC host pattern, or "".
func checkHostPattern(p string) string {
	if p == "" {
		return "must not be empty"
	}
	if strings.Contains(p, "/") {
		if _, err := netip.ParsePrefix(p); err != nil {
			return "an IP prefix must look like 10.0.0.0/8 or 2001:db8::/32"
		}
		return ""
	}
	for _, r := range p {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
			r == '-' || r == '.' || r == '_' || r == '*' || r == '?' || r == ':') {
			return "use only letters, digits, '-', '.', '_', ':' and the wildcards '*' and '?'"
		}
	}
	return ""
}

// control fills c.p.Control from the raw control section. It runs
// after listeners, because PAC rules point at them.
func (c *compiler) control() {
	raw := &c.raw.Control
	ctl := Control{Socket: raw.Socket.Value, SocketMode: DefaultSocketMode, HTTP: raw.HTTP.Value}
	if m, ok := parseSocketMode(raw.SocketMode.Value); ok && raw.SocketMode.IsSet() {
		ctl.SocketMode = m
	}

	for i, r := range raw.PAC {
		path := fmt.Sprintf("control.pac[%d]", i)
		rule := PACRule{Direct: r.Direct.IsSet()}
		for _, h := range r.Hosts {
			if h.IsSet() {
				rule.Hosts = append(rule.Hosts, h.Value)
			}
		}
		if r.App.IsSet() {
			rule.App = c.app(r.App, path+".app")
			if rule.App != nil {
				rule.Listener = c.portListener(rule.App)
				if rule.Listener == nil {
					c.errs.add(r.App.Pos, path+".app",
						"no listener identifies app %q by its port: a browser using a PAC file sends no proxy credentials, so add a listener with app: %s",
						rule.App.Name, rule.App.Name)
				}
			}
		}
		ctl.PAC = append(ctl.PAC, rule)
	}
	c.p.Control = ctl
}

// portListener returns the first listener whose port identifies app.
func (c *compiler) portListener(app *App) *Listener {
	for _, l := range c.p.Listeners {
		if l.App == app {
			return l
		}
	}
	return nil
}
