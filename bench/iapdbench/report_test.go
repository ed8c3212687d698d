package main

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestMedian(t *testing.T) {
	tests := []struct {
		name    string
		samples []float64
		want    float64
	}{
		{name: "one", samples: []float64{4}, want: 4},
		{name: "odd count", samples: []float64{9, 1, 5}, want: 5},
		{name: "even count", samples: []float64{4, 1, 3, 2}, want: 2.5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := median(tt.samples)
			if got == nil || *got != tt.want {
				t.Errorf("median(%v) = %v, want %v", tt.samples, got, tt.want)
			}
		})
	}
	if got := median(nil); got != nil {
		t.Errorf("median(nil) = %v, want nil", *got)
	}
}

func TestPercentile(t *testing.T) {
	var sr setupResult
	for i := 1; i <= 200; i++ {
		sr.latencies = append(sr.latencies, time.Duration(i)*time.Millisecond)
	}
	tests := []struct {
		name string
		p    float64
		want time.Duration
	}{
		{name: "p50", p: 50, want: 100 * time.Millisecond},
		{name: "p99", p: 99, want: 198 * time.Millisecond},
		{name: "p100", p: 100, want: 200 * time.Millisecond},
		{name: "p0 clamps to the first", p: 0, want: 1 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := sr.percentile(tt.p); got != tt.want {
				t.Errorf("percentile(%v) = %v, want %v", tt.p, got, tt.want)
			}
		})
	}
}

func TestResultsTableAndJSON(t *testing.T) {
	res := newResults(&options{repeat: 2, phases: allPhases})
	res.add(sectionRelay, "upload, 1 stream", "direct", "MB/s", 1000)
	res.add(sectionRelay, "upload, 1 stream", "direct", "MB/s", 3000)
	res.add(sectionRelay, "upload, 1 stream", "socks5", "MB/s", 500)
	res.add(sectionRelay, "upload, 1 stream", "socks5", "MB/s", 500)
	res.figure(sectionMemory, "goroutines with 10 tunnels", "socks5", "")
	res.addError(sectionRelay, "setup rate", "http", "conn/s", 3, errors.New("connection refused"))

	table := res.table()
	for _, want := range []string{
		"2000|",      // median of direct
		"500 (0.25)", // ratio of socks5 to direct
		"n/a|",       // figure without samples
		"setup rate, http: 3 failed (first: connection refused)",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}

	dir := t.TempDir()
	if err := res.write(dir, table); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var decoded results
	if err := json.Unmarshal(data, &decoded); err != nil {
		t.Fatalf("decoding results.json: %v", err)
	}
	if decoded.Meta.Cores <= 0 || decoded.Meta.Kernel == "" || decoded.Meta.GoVersion == "" {
		t.Errorf("meta = %+v, want cores, kernel and Go version", decoded.Meta)
	}
	f := decoded.lookup(sectionRelay, "upload, 1 stream", "socks5")
	if f == nil {
		t.Fatal("results.json lacks the socks5 upload figure")
	}
	if f.Column != "socks5" || f.Ratio == nil || *f.Ratio != 0.25 || f.Baseline != "direct" {
		t.Errorf("socks5 figure = %+v, want ratio 0.25 to direct", f)
	}
}

func TestFormatNumber(t *testing.T) {
	tests := []struct {
		name string
		v    float64
		want string
	}{
		{name: "integer", v: 9, want: "9"},
		{name: "large", v: 1234.56, want: "1235"},
		{name: "tens", v: 23.64, want: "23.6"},
		{name: "units", v: 1.714, want: "1.71"},
		{name: "fraction", v: 0.2831, want: "0.283"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := formatNumber(tt.v); got != tt.want {
				t.Errorf("formatNumber(%v) = %q, want %q", tt.v, got, tt.want)
			}
		})
	}
}

func TestParseOptions(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string
		check   func(t *testing.T, o *options)
	}{
		{name: "defaults", check: func(t *testing.T, o *options) {
			if o.bulkMiB != 1024 || o.setupDuration != 5*time.Second || o.tunnels != 10000 || o.repeat != 3 {
				t.Errorf("defaults = %+v", o)
			}
		}},
		{name: "quick keeps explicit flags", args: []string{"-quick", "-tunnels", "500"}, check: func(t *testing.T, o *options) {
			if o.bulkMiB != 128 || o.tunnels != 500 || o.setupDuration != time.Second {
				t.Errorf("quick = %+v, want 128 MiB, 500 tunnels, 1s", o)
			}
		}},
		{name: "phases keep canonical order", args: []string{"-phases", "memory,bulk"}, check: func(t *testing.T, o *options) {
			if strings.Join(o.phases, ",") != "bulk,memory" {
				t.Errorf("phases = %v, want [bulk memory]", o.phases)
			}
		}},
		{name: "unknown phase", args: []string{"-phases", "bulk,latency"}, wantErr: `invalid -phases entry "latency": use dns, bulk, setup, memory`},
		{name: "zero repeat", args: []string{"-repeat", "0"}, wantErr: "invalid -repeat: must be above zero"},
		{name: "unknown profile mode", args: []string{"-profile-mode", "socks4"}, wantErr: `invalid -profile-mode: unknown mode "socks4": use socks5, socks5-auth, http`},
		{name: "profile with direct-only", args: []string{"-profile", "x", "-direct-only"}, wantErr: "-profile and -direct-only exclude each other"},
		{name: "stray argument", args: []string{"bench"}, wantErr: `unexpected argument "bench"`},
		{name: "unknown peer", args: []string{"-peers", "squid"}, wantErr: `invalid -peers: unknown peer "squid": use auto, none or a list of go-minimal, microsocks, dante`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseOptions(tt.args, io.Discard)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, o)
		})
	}
}

func TestResultsNoteOnce(t *testing.T) {
	res := newResults(&options{repeat: 1, phases: allPhases})
	res.note("tunnels lowered from %d to what fits", 10000)
	res.note("tunnels lowered from %d to what fits", 10000)
	res.note("another note")
	want := []string{"tunnels lowered from 10000 to what fits", "another note"}
	if !slices.Equal(res.Notes, want) {
		t.Errorf("notes = %q, want %q", res.Notes, want)
	}
}
