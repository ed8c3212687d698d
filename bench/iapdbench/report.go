package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// results collects every sample of a run and renders the table and the
// JSON file.
type results struct {
	Meta    meta      `json:"meta"`
	Figures []*figure `json:"figures"`
	Notes   []string  `json:"notes,omitempty"`
}

// meta describes the machine and the settings of a run.
type meta struct {
	Commit      string  `json:"commit"`
	Dirty       bool    `json:"dirty"`
	Date        string  `json:"date"`
	Cores       int     `json:"cores"`
	CPUModel    string  `json:"cpu_model,omitempty"`
	GoVersion   string  `json:"go_version"`
	Kernel      string  `json:"kernel"`
	IapdVersion string  `json:"iapd_version,omitempty"`
	Seconds     float64 `json:"seconds"`

	Repeat        int      `json:"repeat"`
	Quick         bool     `json:"quick"`
	Ends          string   `json:"ends"`
	DirectOnly    bool     `json:"direct_only"`
	Phases        []string `json:"phases"`
	BulkMiB       int      `json:"bulk_mib"`
	Streams       int      `json:"streams"`
	SetupSeconds  float64  `json:"setup_seconds"`
	SetupWorkers  int      `json:"setup_workers"`
	Tunnels       int      `json:"tunnels_requested"`
	DNSSeconds    float64  `json:"dns_seconds"`
	DNSWorkers    int      `json:"dns_workers"`
	TCPTWReuse    string   `json:"tcp_tw_reuse,omitempty"`
	EphemeralPort string   `json:"ip_local_port_range,omitempty"`
}

// figure is one measure in one column (a mode, or a resolver), with the
// sample of each repeat.
type figure struct {
	Section  string    `json:"section"`
	Measure  string    `json:"measure"`
	Column   string    `json:"column"`
	Unit     string    `json:"unit"`
	Samples  []float64 `json:"samples"`
	Median   *float64  `json:"median"`
	Ratio    *float64  `json:"ratio_to_baseline,omitempty"`
	Baseline string    `json:"baseline,omitempty"`

	Errors     int    `json:"errors,omitempty"`
	FirstError string `json:"first_error,omitempty"`
}

// section is one table of the output.
type section struct {
	key      string
	title    string
	columns  []string
	baseline string // column the ratios compare with; empty for none
}

const (
	sectionRelay        = "relay"
	sectionMemory       = "memory"
	sectionScaleTunnels = "scale-tunnels"
	sectionScaleStreams = "scale-streams"
	sectionDNS          = "dns"

	columnOwnResolver = "iapd/dns"
	columnGoResolver  = "net.Resolver"
)

func sections() []section {
	relayColumns := []string{directMode().Name}
	for _, m := range proxyModes() {
		relayColumns = append(relayColumns, m.Name)
	}
	relayColumns = append(relayColumns, peerNames()...)
	return []section{
		{key: sectionRelay, title: "Relay: direct, through iapd and through peer proxies (in brackets: ratio to direct)", columns: relayColumns, baseline: "direct"},
		{key: sectionMemory, title: "Memory with idle tunnels: iapd and peer proxies", columns: memoryColumns()},
		{key: sectionScaleTunnels, title: "SOCKS5 through iapd with idle tunnels open; column: tunnels (in brackets: ratio to 1 tunnel)", columns: scaleSteps, baseline: "1"},
		{key: sectionScaleStreams, title: "Bulk throughput with parallel streams (in brackets: ratio to direct)", columns: scaleStreamModes, baseline: "direct"},
		{key: sectionDNS, title: "Resolver of package dns against Go's net.Resolver, which has no cache (in brackets: ratio to net.Resolver)", columns: []string{columnOwnResolver, columnGoResolver}, baseline: columnGoResolver},
	}
}

func newResults(o *options) *results {
	commit, dirty := gitCommit()
	return &results{Meta: meta{
		Commit:        commit,
		Dirty:         dirty,
		Date:          time.Now().UTC().Format(time.RFC3339),
		Cores:         runtime.NumCPU(),
		CPUModel:      cpuModel(),
		GoVersion:     runtime.Version(),
		Kernel:        kernelRelease(),
		Repeat:        o.repeat,
		Quick:         o.quick,
		Ends:          o.ends,
		DirectOnly:    o.directOnly,
		Phases:        o.phases,
		BulkMiB:       o.bulkMiB,
		Streams:       o.streams,
		SetupSeconds:  o.setupDuration.Seconds(),
		SetupWorkers:  o.setupWorkers,
		Tunnels:       o.tunnels,
		DNSSeconds:    o.dnsDuration.Seconds(),
		DNSWorkers:    o.dnsWorkers,
		TCPTWReuse:    readSysctl("/proc/sys/net/ipv4/tcp_tw_reuse"),
		EphemeralPort: readSysctl("/proc/sys/net/ipv4/ip_local_port_range"),
	}}
}

// gitCommit returns the commit of the working directory's repository and
// whether the tree has uncommitted changes.
func gitCommit() (string, bool) {
	out, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		return "unknown", false
	}
	status, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output()
	return strings.TrimSpace(string(out)), err == nil && len(strings.TrimSpace(string(status))) > 0
}

// figure returns the figure of measure in column, creating it on first use.
func (r *results) figure(sec, measure, column, unit string) *figure {
	for _, f := range r.Figures {
		if f.Section == sec && f.Measure == measure && f.Column == column {
			return f
		}
	}
	f := &figure{Section: sec, Measure: measure, Column: column, Unit: unit, Samples: []float64{}}
	r.Figures = append(r.Figures, f)
	return f
}

// add records one sample.
func (r *results) add(sec, measure, column, unit string, value float64) {
	f := r.figure(sec, measure, column, unit)
	f.Samples = append(f.Samples, value)
}

// addError records a failed attempt of a measure, keeping the first error.
func (r *results) addError(sec, measure, column, unit string, count int, err error) {
	f := r.figure(sec, measure, column, unit)
	f.Errors += count
	if f.FirstError == "" && err != nil {
		f.FirstError = err.Error()
	}
}

// note adds a line to the notes under the tables, unless the same line is
// there already.
func (r *results) note(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	if !slices.Contains(r.Notes, line) {
		r.Notes = append(r.Notes, line)
	}
}

// finish computes the medians and the ratios to each section's baseline.
func (r *results) finish() {
	for _, f := range r.Figures {
		f.Median = median(f.Samples)
	}
	for _, sec := range sections() {
		if sec.baseline == "" {
			continue
		}
		for _, f := range r.Figures {
			if f.Section != sec.key || f.Column == sec.baseline || f.Median == nil {
				continue
			}
			base := r.lookup(sec.key, f.Measure, sec.baseline)
			if base == nil || base.Median == nil || *base.Median == 0 {
				continue
			}
			ratio := *f.Median / *base.Median
			f.Ratio = &ratio
			f.Baseline = sec.baseline
		}
	}
}

func (r *results) lookup(sec, measure, column string) *figure {
	for _, f := range r.Figures {
		if f.Section == sec && f.Measure == measure && f.Column == column {
			return f
		}
	}
	return nil
}

// median returns the median of samples, or nil when there are none.
func median(samples []float64) *float64 {
	if len(samples) == 0 {
		return nil
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return &m
}

// table renders the medians, one table per section that has figures.
func (r *results) table() string {
	r.finish()
	var b strings.Builder
	fmt.Fprintf(&b, "iapdbench %s  commit %s%s  %d cores  %s  kernel %s  %d repeats, medians  ends: %s\n",
		r.Meta.Date, shortCommit(r.Meta.Commit), map[bool]string{true: "+dirty"}[r.Meta.Dirty], r.Meta.Cores, r.Meta.GoVersion, r.Meta.Kernel, r.Meta.Repeat, r.Meta.Ends)

	for _, sec := range sections() {
		var measures []string
		units := map[string]string{}
		used := map[string]bool{} // columns with figures; peers not run have none
		for _, f := range r.Figures {
			if f.Section != sec.key {
				continue
			}
			used[f.Column] = true
			if !slices.Contains(measures, f.Measure) {
				measures = append(measures, f.Measure)
				units[f.Measure] = f.Unit
			}
		}
		if len(measures) == 0 {
			continue
		}
		columns := slices.DeleteFunc(slices.Clone(sec.columns), func(c string) bool { return !used[c] })

		fmt.Fprintf(&b, "\n%s\n", sec.title)
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight|tabwriter.Debug)
		fmt.Fprintf(tw, "measure\tunit\t")
		for _, c := range columns {
			fmt.Fprintf(tw, "%s\t", c)
		}
		fmt.Fprintln(tw)
		for _, m := range measures {
			fmt.Fprintf(tw, "%s\t%s\t", m, units[m])
			for _, c := range columns {
				fmt.Fprintf(tw, "%s\t", formatCell(r.lookup(sec.key, m, c)))
			}
			fmt.Fprintln(tw)
		}
		tw.Flush()
	}

	var errs []string
	for _, f := range r.Figures {
		if f.Errors > 0 {
			errs = append(errs, fmt.Sprintf("%s, %s: %d failed (first: %s)", f.Measure, f.Column, f.Errors, f.FirstError))
		}
	}
	if len(errs) > 0 {
		fmt.Fprintf(&b, "\nErrors:\n  %s\n", strings.Join(errs, "\n  "))
	}
	if len(r.Notes) > 0 {
		fmt.Fprintf(&b, "\nNotes:\n  %s\n", strings.Join(r.Notes, "\n  "))
	}
	return b.String()
}

func formatCell(f *figure) string {
	if f == nil {
		return "-"
	}
	if f.Median == nil {
		return "n/a"
	}
	s := formatNumber(*f.Median)
	if f.Ratio != nil {
		s += fmt.Sprintf(" (%.2f)", *f.Ratio)
	}
	return s
}

// formatNumber prints about three significant digits without exponents.
func formatNumber(v float64) string {
	switch a := math.Abs(v); {
	case a == math.Trunc(a) || a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

func shortCommit(c string) string {
	if len(c) > 12 {
		return c[:12]
	}
	return c
}

// write stores results.json and the printed table as results.txt in dir.
func (r *results) write(dir, table string) error {
	r.finish()
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.txt"), []byte(table), 0o644); err != nil {
		return fmt.Errorf("writing results: %w", err)
	}
	return nil
}
