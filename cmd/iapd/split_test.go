package main

import (
	"context"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"iapd/internal/netnstest"
	"iapd/internal/testbed"
)

// Addresses of the corporate uplink in the split-tunnel tests.
var (
	corpWeb     = netip.MustParseAddr("198.51.100.10")         // intranet site, reachable only through corp
	corpGateway = netip.MustParseAddrPort("198.51.100.8:1080") // SOCKS5 enterprise gateway
	corpDNSLL   = netip.MustParseAddr("fe80::53")              // corp's DNS server on its link
)

const (
	devPasswordEnv = "IAPD_E2E_DEV_PASSWORD"
	devPassword    = "dev-secret"
	gwPasswordEnv  = "IAPD_E2E_GATEWAY_PASSWORD"
	gwPassword     = "gateway-secret"
)

// splitPolicy is a corporate split tunnel. dev and ops send *.corp.test
// and the corp range to corp, whose DNS server is link-local, and all else
// to wifi; dev may choose cell or the internet destination per connection,
// ops may not. mobile uses the enterprise gateway while it answers and
// wifi directly otherwise. cell's DNS server is an IPv6 address. Only
// wifi holds the host's default route, so the others name their gateway.
const splitPolicy = `
listeners:
  - listen: "127.0.0.1:1090"
    protocol: socks5
    users:
      - {name: dev, password_env: ` + devPasswordEnv + `, app: dev}
      - {name: ops, password_env: ` + devPasswordEnv + `, app: ops}
  - listen: "127.0.0.1:3140"
    protocol: http
    users:
      - {name: dev, password_env: ` + devPasswordEnv + `, app: dev}
  - listen: "127.0.0.1:1091"
    protocol: socks5
    app: mobile
apps:
  dev:
    access_point: wifi
    allow_override: [cell, internet]
    dns_listen: "127.0.0.1:5390"
    routes:
      - domain_suffix: corp.test
        cidr: 198.51.100.0/24
        access_point: corp
      - domain: blocked.test
        reject: true
  ops:
    access_point: wifi
    routes:
      - domain_suffix: corp.test
        access_point: corp
  mobile:
    destination: gateway-first
access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
  cell:
    interface: cell
    dns: ["2001:db8:ff::53"]
    gateway: [192.0.2.1, "2001:db8:1::1"]
  corp:
    interface: corp
    dns: ["fe80::53%corp"]
    gateway: [192.0.2.1, "2001:db8:1::1"]
  corp-gateway:
    interface: corp
    gateway: [192.0.2.1]
    proxy:
      url: "socks5://198.51.100.8:1080"
      user: gw
      password_env: ` + gwPasswordEnv + `
destinations:
  internet:
    access_points: [wifi, cell]
  gateway-first:
    access_points: [corp-gateway, wifi]
`

const (
	viaCorp         = "uplink=corp client=192.0.2.2\n"
	curlNotAllowed  = 97 // CURLE_PROXY: curl's exit code when the SOCKS5 reply is not success
	socksDev        = "socks5h://dev:" + devPassword + "@127.0.0.1:1090"
	socksDevCell    = "socks5h://dev+cell:" + devPassword + "@127.0.0.1:1090"
	socksDevCellDst = "socks5h://dev+internet:" + devPassword + "@127.0.0.1:1090"
)

// queryLogs returns the DNS query log of every uplink, by name.
func queryLogs(bed *testbed.Bed) map[string][]string {
	logs := make(map[string][]string)
	for _, u := range bed.Uplinks() {
		logs[u.Name] = u.Queries()
	}
	return logs
}

func resetQueryLogs(bed *testbed.Bed) {
	for _, u := range bed.Uplinks() {
		u.ResetQueries()
	}
}

// checkQueryLogs compares every uplink's query log with want, where a
// missing uplink must have been asked nothing. Order within a log is not
// fixed, since A and AAAA go out together.
func checkQueryLogs(t *testing.T, bed *testbed.Bed, want map[string][]string) {
	t.Helper()
	for name, got := range queryLogs(bed) {
		got = slices.Sorted(slices.Values(got))
		exp := slices.Sorted(slices.Values(want[name]))
		if !slices.Equal(got, exp) {
			t.Errorf("%s's DNS server was asked %q, want %q", name, got, exp)
		}
	}
}

func TestPrivilegedSplitTunnel(t *testing.T) {
	netnstest.Require(t)
	if _, err := exec.LookPath("dig"); err != nil {
		t.Fatalf("dig (Debian package bind9-dnsutils) is needed: %v", err)
	}
	bed := testbed.New(t, testbed.Options{Uplinks: []string{"wifi", "cell", "corp"}, DefaultVia: "wifi"})
	corp := bed.Uplink("corp")
	corp.AddSite(t, "corp.test", corpWeb)
	corp.AddLinkLocalDNS(t, corpDNSLL)
	gateway := corp.StartGateway(t, corpGateway, "gw", gwPassword)
	bed.Start(t, splitPolicy, devPasswordEnv+"="+devPassword, gwPasswordEnv+"="+gwPassword)

	tests := []struct {
		name    string
		args    []string
		code    int
		want    string
		queries map[string][]string
	}{
		{
			name:    "corp name out of corp with corp's link-local DNS",
			args:    []string{"-x", socksDev, "http://www.corp.test/"},
			want:    viaCorp,
			queries: map[string][]string{"corp": {"www.corp.test. A", "www.corp.test. AAAA"}},
		},
		{
			name:    "public name out of wifi",
			args:    []string{"-x", socksDev, "http://www.wifi.test/"},
			want:    viaWifi,
			queries: map[string][]string{"wifi": {"www.wifi.test. A", "www.wifi.test. AAAA"}},
		},
		{
			name: "corp range address out of corp",
			args: []string{"-x", socksDev, "http://198.51.100.10/"},
			want: viaCorp,
		},
		{
			name: "rejected name",
			args: []string{"-x", socksDev, "http://blocked.test/"},
			code: curlNotAllowed,
		},
		{
			name: "rejected name over http",
			args: []string{"-x", "http://dev:" + devPassword + "@127.0.0.1:3140", "-w", "%{http_code}", "-o", "/dev/null", "http://blocked.test/"},
			want: "403",
		},
		{
			name:    "dev+cell chooses cell with its IPv6 DNS server",
			args:    []string{"-x", socksDevCell, "http://both.test/"},
			want:    viaCell,
			queries: map[string][]string{"cell": {"both.test. A", "both.test. AAAA"}},
		},
		{
			name:    "dev+internet chooses the destination",
			args:    []string{"-x", socksDevCellDst, "http://v6.wifi.test/"},
			want:    viaWifiV6,
			queries: map[string][]string{"wifi": {"v6.wifi.test. A", "v6.wifi.test. AAAA"}},
		},
		{
			name: "dev+cell refused for a corp name",
			args: []string{"-x", socksDevCell, "http://www.corp.test/"},
			code: curlNotAllowed,
		},
		{
			name: "ops+cell refused",
			args: []string{"-x", "socks5h://ops+cell:" + devPassword + "@127.0.0.1:1090", "http://www.wifi.test/"},
			code: curlNotAllowed,
		},
		{
			name:    "gateway carries a corp name and resolves it itself",
			args:    []string{"-x", "socks5h://127.0.0.1:1091", "http://intranet.corp.test/"},
			want:    "uplink=corp client=198.51.100.10\n",
			queries: map[string][]string{"corp": {"intranet.corp.test. A"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resetQueryLogs(bed)
			out, code := bed.Curl(t, tt.args...)
			if code != tt.code {
				t.Errorf("curl exit code %d, want %d", code, tt.code)
			}
			if out != tt.want {
				t.Errorf("curl output %q, want %q", out, tt.want)
			}
			checkQueryLogs(t, bed, tt.queries)
		})
	}
	if got, want := gateway.Targets(), []string{"intranet.corp.test:80"}; !slices.Equal(got, want) {
		t.Errorf("gateway was asked for %q, want %q", got, want)
	}

	t.Run("dns listener gives the split view", func(t *testing.T) {
		resetQueryLogs(bed)
		digTests := []struct {
			name string
			args []string
			want string
		}{
			{name: "corp name", args: []string{"+short", "www.corp.test", "A"}, want: "198.51.100.10\n"},
			{name: "public name", args: []string{"+short", "www.wifi.test", "AAAA"}, want: "2001:db8:ff::10\n"},
			{name: "corp name over tcp", args: []string{"+short", "+tcp", "db.corp.test", "A"}, want: "198.51.100.10\n"},
			{name: "rejected name", args: []string{"+noall", "+comments", "blocked.test", "A"}, want: "status: REFUSED"},
			{name: "corp name unknown to wifi", args: []string{"+noall", "+comments", "www.cell.test", "A"}, want: "status: NXDOMAIN"},
		}
		for _, tt := range digTests {
			out := dig(t, bed, tt.args...)
			if !strings.Contains(out, tt.want) {
				t.Errorf("dig %s: output %q, want it to contain %q", tt.name, out, tt.want)
			}
		}
		checkQueryLogs(t, bed, map[string][]string{
			"corp": {"www.corp.test. A", "db.corp.test. A"},
			"wifi": {"www.wifi.test. AAAA", "www.cell.test. A"},
		})
	})

	t.Run("stopped gateway fails over to wifi", func(t *testing.T) {
		gateway.Stop()
		resetQueryLogs(bed)
		out, code := bed.Curl(t, "-x", "socks5h://127.0.0.1:1091", "http://both.test/")
		if code != 0 || out != viaWifi {
			t.Errorf("curl: exit %d and body %q, want exit 0 and %q", code, out, viaWifi)
		}
		checkQueryLogs(t, bed, map[string][]string{"wifi": {"both.test. A", "both.test. AAAA"}})
	})
}

// dig queries dev's DNS listener with dig in the host namespace.
func dig(t *testing.T, bed *testbed.Bed, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	all := append([]string{"@127.0.0.1", "-p", "5390", "+time=3", "+tries=1"}, args...)
	out, err := bed.Host.Command(ctx, "dig", all...).CombinedOutput()
	t.Logf("dig %s: %v\n%s", strings.Join(args, " "), err, out)
	if err != nil {
		t.Fatalf("dig %s: %v", strings.Join(args, " "), err)
	}
	return string(out)
}
