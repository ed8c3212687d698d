// Command iapd is a per-application SOCKS5 and HTTP proxy that sends each
// application's connections out of the interface its policy names.
package main

import (
	"os"

	"iapd/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
