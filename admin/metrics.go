package admin

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"iapd/internal/event"
	"iapd/proxy"
)

// Metrics holds iapd's Prometheus metrics, on a registry of its own. Counts
// of connections and bytes, access point usability and the destinations'
// choices are read from the daemon at each scrape; the rest is counted as
// it happens. It is safe for concurrent use; create it with NewMetrics.
type Metrics struct {
	registry *prometheus.Registry

	dialErrors   *prometheus.CounterVec
	dialDuration *prometheus.HistogramVec
	dnsLookups   *prometheus.CounterVec
	dnsDuration  *prometheus.HistogramVec
	switches     *prometheus.CounterVec
	reloads      *prometheus.CounterVec
}

// NewMetrics registers iapd's metrics. Scrapes read the daemon's state
// through d and usage, and the version is exported as iapd_build_info.
func NewMetrics(d Daemon, usage *Usage, bus *event.Bus, version string) *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		dialErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "iapd_dial_errors_total",
			Help: "Failed attempts to reach a target, by app, access point (empty when none was usable) and reason.",
		}, []string{"app", "access_point", "reason"}),
		dialDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "iapd_dial_duration_seconds",
			Help:    "Time to resolve and connect to a target through an access point, for attempts that connected.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"access_point"}),
		dnsLookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "iapd_dns_lookups_total",
			Help: "Name lookups by an access point's resolver, by result (ok, not_found, error).",
		}, []string{"access_point", "result"}),
		dnsDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "iapd_dns_lookup_duration_seconds",
			Help:    "Time of a name lookup by an access point's resolver, cache hits included.",
			Buckets: []float64{.0005, .001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 15},
		}, []string{"access_point"}),
		switches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "iapd_destination_switches_total",
			Help: "Times a destination's first choice of access point changed.",
		}, []string{"destination"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "iapd_policy_reloads_total",
			Help: "Policy reloads, by result (applied, rejected).",
		}, []string{"result"}),
	}
	m.registry.MustRegister(
		m.dialErrors, m.dialDuration, m.dnsLookups, m.dnsDuration, m.switches, m.reloads,
		&stateCollector{d: d, usage: usage, bus: bus},
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "iapd_build_info",
			Help:        "Always 1; the version label is iapd's version.",
			ConstLabels: prometheus.Labels{"version": version},
		}, func() float64 { return 1 }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}

// Registry returns the registry, for tests and for gathering directly.
func (m *Metrics) Registry() *prometheus.Registry { return m.registry }

// DialAttempt counts a failed attempt by reason, and times one that
// connected. It is meant for proxy.Config.OnDialAttempt.
func (m *Metrics) DialAttempt(a proxy.DialAttempt) {
	if a.Err == nil {
		m.dialDuration.WithLabelValues(a.AccessPoint).Observe(a.Duration.Seconds())
		return
	}
	m.dialErrors.WithLabelValues(a.App, a.AccessPoint, DialErrorReason(a.Err)).Inc()
}

// DNSLookup counts one lookup by the resolver of the access point named ap.
func (m *Metrics) DNSLookup(ap string, d time.Duration, err error) {
	result := "ok"
	var dnsErr *net.DNSError
	switch {
	case err == nil:
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		result = "not_found"
	default:
		result = "error"
	}
	m.dnsLookups.WithLabelValues(ap, result).Inc()
	m.dnsDuration.WithLabelValues(ap).Observe(d.Seconds())
}

// DestinationSwitched counts a change of a destination's first choice.
func (m *Metrics) DestinationSwitched(destination string) {
	m.switches.WithLabelValues(destination).Inc()
}

// Reloaded counts a reload that was applied, or rejected when ok is false.
func (m *Metrics) Reloaded(ok bool) {
	result := "applied"
	if !ok {
		result = "rejected"
	}
	m.reloads.WithLabelValues(result).Inc()
}

// DialErrorReason sorts a dial error into the reason label of
// iapd_dial_errors_total: no_usable_access_point, resolve, refused,
// timeout, unreachable or other.
func DialErrorReason(err *proxy.DialError) string {
	var ne net.Error
	switch {
	case err.Op == "select":
		return "no_usable_access_point"
	case err.Op == "resolve":
		return "resolve"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH):
		return "unreachable"
	}
	return "other"
}

// stateCollector exports what is read from the daemon at scrape time.
type stateCollector struct {
	d     Daemon
	usage *Usage
	bus   *event.Bus
}

var (
	connsOpenDesc = prometheus.NewDesc("iapd_connections_open",
		"Connections open now, by app and access point.", []string{"app", "access_point"}, nil)
	connsTotalDesc = prometheus.NewDesc("iapd_connections_total",
		"Connections opened since iapd started, by app and access point.", []string{"app", "access_point"}, nil)
	bytesDesc = prometheus.NewDesc("iapd_bytes_total",
		"Bytes relayed since iapd started, by app, access point and direction (up: client to target; down: target to client).",
		[]string{"app", "access_point", "direction"}, nil)
	usableDesc = prometheus.NewDesc("iapd_access_point_usable",
		"1 when the access point can carry connections now, else 0.", []string{"access_point", "interface"}, nil)
	currentDesc = prometheus.NewDesc("iapd_destination_access_point",
		"1 for the access point that new connections of the destination try first.", []string{"destination", "access_point"}, nil)
	droppedDesc = prometheus.NewDesc("iapd_events_dropped_total",
		"Events that a slow subscriber of the event stream missed.", nil, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{connsOpenDesc, connsTotalDesc, bytesDesc, usableDesc, currentDesc, droppedDesc} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	for _, r := range c.usage.Rows() {
		ch <- prometheus.MustNewConstMetric(connsOpenDesc, prometheus.GaugeValue, float64(r.Open), r.App, r.AccessPoint)
		ch <- prometheus.MustNewConstMetric(connsTotalDesc, prometheus.CounterValue, float64(r.Total), r.App, r.AccessPoint)
		ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(r.BytesUp), r.App, r.AccessPoint, "up")
		ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(r.BytesDown), r.App, r.AccessPoint, "down")
	}

	p := c.d.Policy()
	conditions := c.d.Conditions()
	for _, ap := range p.AccessPointOrder {
		v := 0.0
		if conditions.Status(ap).Usable {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(usableDesc, prometheus.GaugeValue, v, ap.Name, ap.Interface)
	}
	for _, dest := range SortedDestinations(p) {
		if current, _ := currentChoice(dest, conditions); current != "" {
			ch <- prometheus.MustNewConstMetric(currentDesc, prometheus.GaugeValue, 1, dest.Name, current)
		}
	}
	ch <- prometheus.MustNewConstMetric(droppedDesc, prometheus.CounterValue, float64(c.bus.Dropped()))
}
