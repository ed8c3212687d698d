//go:build !linux

package dns

// watchLeaseDirs does nothing where inotify is missing: the watcher's
// periodic reads still pick up changed leases.
func watchLeaseDirs(globs []string, kick func()) (func(), error) { return func() {}, nil }
