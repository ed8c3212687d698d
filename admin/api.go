package admin

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"time"

	"iapd/iface"
	"iapd/policy"
)

// This file contains the JSON documents of the control API and the
// handlers that read them. Field names are part of the API that scripts
// use; add fields, never rename them.

// Status is the document of GET /v1/status.
type Status struct {
	Version       string           `json:"version"`
	PID           int              `json:"pid"`
	Started       time.Time        `json:"started"`
	UptimeSeconds float64          `json:"uptime_seconds"`
	Policy        PolicyStatus     `json:"policy"`
	Listeners     []ListenerStatus `json:"listeners"`
	// DNSListeners are the apps' DNS listeners (dns_listen), by app name.
	DNSListeners []DNSListenerStatus `json:"dns_listeners"`
	Connections  int                 `json:"connections"`
	// EventsDropped counts events that a slow subscriber missed.
	EventsDropped uint64 `json:"events_dropped"`
}

// PolicyStatus names the policy being served.
type PolicyStatus struct {
	Path string `json:"path"`
	Hash string `json:"sha256"`
}

// ListenerStatus is one listener of the policy and how busy its socket
// is. The counters belong to the socket, so they go on across a reload
// that keeps the listener's address.
type ListenerStatus struct {
	Listen    string   `json:"listen"`  // as written in the policy
	Address   string   `json:"address"` // bound address, with the port the kernel chose
	Protocol  string   `json:"protocol"`
	App       string   `json:"app,omitempty"`   // when the port identifies the app
	Users     []string `json:"users,omitempty"` // when credentials do
	UserCount int      `json:"user_count"`      // len(Users)
	// Connections counts the clients being served now, from accept to
	// close, handshakes included: what max_connections caps.
	Connections    int    `json:"connections"`
	MaxConnections int    `json:"max_connections"`
	ClientsRefused uint64 `json:"clients_refused"` // closed at accept: outside allow_clients
	FullRejections uint64 `json:"full_rejections"` // closed at accept: at max_connections
}

// DNSListenerStatus is the DNS listener of one app and the queries it
// answered. The counters go on across a reload that keeps the address,
// even when the address passes to another app.
type DNSListenerStatus struct {
	App        string `json:"app"`
	Listen     string `json:"listen"`      // dns_listen of the app
	UDPAddress string `json:"udp_address"` // bound address of the UDP socket
	TCPAddress string `json:"tcp_address"` // bound address of the TCP socket
	Queries    uint64 `json:"queries"`     // answered, whatever the rcode
	// Refused and Failed count the queries that iapd itself answered
	// REFUSED (the app's policy rejects the name) and SERVFAIL (no
	// resolver answered, or none was usable).
	Refused uint64 `json:"queries_refused"`
	Failed  uint64 `json:"queries_failed"`
}

// InterfaceStatus is one network interface.
type InterfaceStatus struct {
	Name     string   `json:"name"`
	Index    int      `json:"index"`
	Up       bool     `json:"up"`
	Carrier  bool     `json:"carrier"`
	Addrs    []string `json:"addrs"`
	Gateways []string `json:"gateways"`
	// Default lists the families, "ipv4" and "ipv6", whose main-table
	// default route goes through this interface.
	Default []string `json:"default,omitempty"`
}

// AccessPointStatus is one access point and what went through it since
// iapd started.
type AccessPointStatus struct {
	Name      string `json:"name"`
	Interface string `json:"interface"` // as the policy names it
	Device    string `json:"device"`    // the interface it sends through now
	Usable    bool   `json:"usable"`
	Reason    string `json:"reason,omitempty"` // why it is not usable
	Probe     string `json:"probe,omitempty"`  // the health probe and its state; empty without one
	// LatencyMS is the smoothed time to connect through it, from real
	// connections; absent until one connected.
	LatencyMS    *float64 `json:"latency_ms,omitempty"`
	Connections  int      `json:"connections"`       // open now
	Total        uint64   `json:"connections_total"` // opened since start
	BytesUp      int64    `json:"bytes_up"`
	BytesDown    int64    `json:"bytes_down"`
	DialFailures uint64   `json:"dial_failures"`
}

// DestinationStatus is one destination and the access point new
// connections of its apps use now.
type DestinationStatus struct {
	Name         string   `json:"name"`
	Implicit     bool     `json:"implicit"` // made from an app's access_point
	AccessPoints []string `json:"access_points"`
	Current      string   `json:"current,omitempty"` // empty when none is usable
	Reason       string   `json:"reason,omitempty"`  // why none is usable
	Apps         []string `json:"apps"`
}

// AppStatus is one app with its connections and bytes per access point.
type AppStatus struct {
	Name         string             `json:"name"`
	Destination  string             `json:"destination"`
	Connections  int                `json:"connections"` // open now
	BytesUp      int64              `json:"bytes_up"`
	BytesDown    int64              `json:"bytes_down"`
	AccessPoints []AppOnAccessPoint `json:"access_points"`
}

// AppOnAccessPoint is what one app sent through one access point.
type AppOnAccessPoint struct {
	AccessPoint string `json:"access_point"`
	Connections int    `json:"connections"`
	Total       uint64 `json:"connections_total"`
	BytesUp     int64  `json:"bytes_up"`
	BytesDown   int64  `json:"bytes_down"`
}

// Conn is one live connection.
type Conn struct {
	ID          uint64    `json:"id"`
	App         string    `json:"app"`
	Listener    string    `json:"listener"`
	Target      string    `json:"target"`
	AccessPoint string    `json:"access_point"`
	Interface   string    `json:"interface"`
	BytesUp     int64     `json:"bytes_up"`
	BytesDown   int64     `json:"bytes_down"`
	Started     time.Time `json:"started"`
	AgeSeconds  float64   `json:"age_seconds"`
}

// ReloadReport is the document of a successful POST /v1/reload.
type ReloadReport struct {
	Policy           PolicyStatus `json:"policy"`
	Changed          bool         `json:"changed"` // false when the file's hash is the same
	ListenersKept    []string     `json:"listeners_kept"`
	ListenersAdded   []string     `json:"listeners_added"`
	ListenersRemoved []string     `json:"listeners_removed"`
	// DNS listeners by address (dns_listen). A kept one may answer for
	// another app than before.
	DNSListenersKept    []string `json:"dns_listeners_kept"`
	DNSListenersAdded   []string `json:"dns_listeners_added"`
	DNSListenersRemoved []string `json:"dns_listeners_removed"`
	ConnectionsClosed   int      `json:"connections_closed"` // over access points that changed or went away
}

// ErrorResponse is the document of every failed request.
type ErrorResponse struct {
	Error string `json:"error"`
	// Problems lists each problem of a policy that a reload rejected.
	Problems []Problem `json:"problems,omitempty"`
}

// Problem is one problem of a policy file, with its place.
type Problem struct {
	File    string `json:"file"`
	Line    int    `json:"line,omitempty"`
	Column  int    `json:"column,omitempty"`
	Path    string `json:"path,omitempty"`
	Message string `json:"message"`
}

// PolicyError returns the problem as the policy package reports it.
func (p Problem) PolicyError() *policy.Error {
	return &policy.Error{File: p.File, Line: p.Line, Column: p.Column, Path: p.Path, Msg: p.Message}
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, s.status())
}

func (s *Server) status() Status {
	d := s.cfg.Daemon
	p := d.Policy()
	open, dnsOpen := d.Listeners()
	if dnsOpen == nil {
		dnsOpen = []DNSListenerStatus{} // [] rather than null in JSON
	}
	return Status{
		Version:       s.cfg.Version,
		PID:           os.Getpid(),
		Started:       s.cfg.Started,
		UptimeSeconds: time.Since(s.cfg.Started).Seconds(),
		Policy:        PolicyStatus{Path: p.Path, Hash: p.Hash},
		Connections:   len(d.Conns()),
		EventsDropped: s.cfg.Bus.Dropped(),
		Listeners:     listeners(open),
		DNSListeners:  dnsOpen,
	}
}

func listeners(open []OpenListener) []ListenerStatus {
	list := []ListenerStatus{}
	for _, ol := range open {
		l := ol.Listener
		ls := ListenerStatus{
			Listen:         l.Listen,
			Address:        ol.Address,
			Protocol:       l.Protocol.String(),
			UserCount:      len(l.Users),
			Connections:    ol.Stats.Connections,
			MaxConnections: l.MaxConnections,
			ClientsRefused: ol.Stats.ClientsRefused,
			FullRejections: ol.Stats.ListenerFull,
		}
		if l.App != nil {
			ls.App = l.App.Name
		}
		for name := range l.Users {
			ls.Users = append(ls.Users, name)
		}
		slices.Sort(ls.Users)
		list = append(list, ls)
	}
	return list
}

func (s *Server) handleInterfaces(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, interfaces(s.cfg.Daemon.Snapshot()))
}

func interfaces(snap *iface.Snapshot) []InterfaceStatus {
	list := []InterfaceStatus{}
	def4, _, ok4 := snap.Default(false)
	def6, _, ok6 := snap.Default(true)
	for _, ifc := range snap.Interfaces() {
		st := InterfaceStatus{Name: ifc.Name, Index: ifc.Index, Up: ifc.Up, Carrier: ifc.Carrier, Addrs: []string{}, Gateways: []string{}}
		for _, a := range ifc.Addrs {
			st.Addrs = append(st.Addrs, a.String())
		}
		for _, g := range ifc.Gateways {
			st.Gateways = append(st.Gateways, g.String())
		}
		if ok4 && def4.Index == ifc.Index {
			st.Default = append(st.Default, "ipv4")
		}
		if ok6 && def6.Index == ifc.Index {
			st.Default = append(st.Default, "ipv6")
		}
		list = append(list, st)
	}
	return list
}

func (s *Server) handleAccessPoints(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, s.accessPoints())
}

func (s *Server) accessPoints() []AccessPointStatus {
	d := s.cfg.Daemon
	p := d.Policy()
	conditions := d.Conditions()
	usage := s.cfg.Usage.ByAccessPoint()
	list := []AccessPointStatus{}
	for _, ap := range p.AccessPointOrder {
		status := conditions.Status(ap)
		u := usage[ap.Name]
		st := AccessPointStatus{
			Name:         ap.Name,
			Interface:    ap.Interface,
			Device:       d.Interface(ap),
			Usable:       status.Usable,
			Reason:       status.Reason,
			Probe:        status.Probe,
			Connections:  u.Open,
			Total:        u.Total,
			BytesUp:      u.BytesUp,
			BytesDown:    u.BytesDown,
			DialFailures: s.cfg.Usage.DialFailures(ap.Name),
		}
		if ms, ok := s.cfg.Usage.Latency(ap.Name); ok {
			st.LatencyMS = &ms
		}
		list = append(list, st)
	}
	return list
}

func (s *Server) handleDestinations(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, destinations(s.cfg.Daemon.Policy(), s.cfg.Daemon.Conditions()))
}

func destinations(p *policy.Policy, conditions policy.Conditions) []DestinationStatus {
	list := []DestinationStatus{}
	for _, dest := range SortedDestinations(p) {
		st := DestinationStatus{Name: dest.Name, Implicit: dest.Implicit, AccessPoints: []string{}, Apps: []string{}}
		for _, ap := range dest.AccessPoints {
			st.AccessPoints = append(st.AccessPoints, ap.Name)
		}
		for _, app := range sortedApps(p) {
			if app.Destination == dest {
				st.Apps = append(st.Apps, app.Name)
			}
		}
		st.Current, st.Reason = currentChoice(dest, conditions)
		list = append(list, st)
	}
	return list
}

// currentChoice returns the access point that a new connection to dest
// would try first, or why there is none.
func currentChoice(dest *policy.Destination, conditions policy.Conditions) (string, string) {
	plan := policy.PlanDestination(dest, conditions)
	if err := plan.Err(); err != nil {
		return "", err.Error()
	}
	return plan.Candidates[0].Name, ""
}

func (s *Server) handleApps(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, s.apps())
}

func (s *Server) apps() []AppStatus {
	p := s.cfg.Daemon.Policy()
	usage := s.cfg.Usage.ByApp()
	list := []AppStatus{}
	for _, app := range sortedApps(p) {
		st := AppStatus{Name: app.Name, AccessPoints: []AppOnAccessPoint{}}
		if app.Destination != nil {
			st.Destination = app.Destination.Name
		}
		for _, row := range usage[app.Name] {
			st.Connections += row.Connections
			st.BytesUp += row.BytesUp
			st.BytesDown += row.BytesDown
			st.AccessPoints = append(st.AccessPoints, row)
		}
		list = append(list, st)
	}
	return list
}

func (s *Server) handleConns(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, s.conns(time.Now()))
}

func (s *Server) conns(now time.Time) []Conn {
	list := []Conn{}
	for _, c := range s.cfg.Daemon.Conns() {
		list = append(list, Conn{
			ID:          c.ID,
			App:         c.App,
			Listener:    c.Listener,
			Target:      c.Target,
			AccessPoint: c.AccessPoint,
			Interface:   c.Interface,
			BytesUp:     c.BytesUp,
			BytesDown:   c.BytesDown,
			Started:     c.Started,
			AgeSeconds:  now.Sub(c.Started).Seconds(),
		})
	}
	return list
}

func (s *Server) handleCloseConn(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("invalid connection ID %q: want a number from iapd conns", r.PathValue("id")))
		return
	}
	if !s.cfg.Daemon.CloseConn(id) {
		writeError(w, http.StatusNotFound, fmt.Errorf("no open connection with ID %d", id))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleExplain(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ex, err := Explain(s.cfg.Daemon.Policy(), s.cfg.Daemon.Conditions(), s.cfg.Daemon.Interface, q.Get("app"), q.Get("target"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	writeJSON(w, ex)
}

func (s *Server) handleReload(w http.ResponseWriter, r *http.Request) {
	report, err := s.cfg.Daemon.Reload()
	if err == nil {
		writeJSON(w, report)
		return
	}

	resp := ErrorResponse{Error: "reload rejected; iapd keeps serving the policy it had: " + err.Error()}
	var list policy.ErrorList
	if errors.As(err, &list) {
		resp.Error = fmt.Sprintf("policy rejected with %d problem(s); iapd keeps serving the policy it had", len(list))
		for _, e := range list {
			resp.Problems = append(resp.Problems, Problem{File: e.File, Line: e.Line, Column: e.Column, Path: e.Path, Message: e.Msg})
			if e.Err != nil {
				last := &resp.Problems[len(resp.Problems)-1]
				if last.Message != "" {
					last.Message += ": "
				}
				last.Message += e.Err.Error()
			}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusUnprocessableEntity)
	json.NewEncoder(w).Encode(resp)
}

func (s *Server) handleControlOnly(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusForbidden, errors.New("this request is only served on the control socket"))
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(ErrorResponse{Error: err.Error()})
}

func sortedApps(p *policy.Policy) []*policy.App {
	apps := make([]*policy.App, 0, len(p.Apps))
	for _, app := range p.Apps {
		apps = append(apps, app)
	}
	slices.SortFunc(apps, func(a, b *policy.App) int { return cmp.Compare(a.Name, b.Name) })
	return apps
}

// SortedDestinations returns p's destinations ordered by name, for a
// stable order in lists and events.
func SortedDestinations(p *policy.Policy) []*policy.Destination {
	dests := make([]*policy.Destination, 0, len(p.Destinations))
	for _, d := range p.Destinations {
		dests = append(dests, d)
	}
	slices.SortFunc(dests, func(a, b *policy.Destination) int { return cmp.Compare(a.Name, b.Name) })
	return dests
}
