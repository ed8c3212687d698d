package policy

import "testing"

// setEnv makes password_env lookups read env instead of the process
// environment until the test ends. Tests that call it must not run in
// parallel.
func setEnv(tb testing.TB, env map[string]string) {
	tb.Helper()
	saved := lookupEnv
	lookupEnv = func(name string) (string, bool) {
		v, ok := env[name]
		return v, ok
	}
	tb.Cleanup(func() { lookupEnv = saved })
}
