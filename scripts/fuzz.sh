#!/bin/sh
# Runs every fuzz test of the module, one after the other, for the time
# given as the first argument (a go test -fuzztime value such as 5s, 2m or
# 10000x; default 5s). The fuzz tests are found with go test -list, so a
# new one needs no entry here. A failing input is written under the
# package's testdata/fuzz/ and from then on runs with every go test.
set -eu

fuzztime=${1:-5s}
go=${GO:-go}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# fuzz runs one fuzz test and prints its output. go test sometimes ends a
# fuzz run that found nothing with "context deadline exceeded" when a
# worker is slow to stop at the end of -fuzztime; such a run wrote no
# failing input, so it is run once more instead of failing the build.
fuzz() {
	if $go test -run '^$' -fuzz "^$2\$" -fuzztime "$fuzztime" "$1" >"$log" 2>&1; then
		cat "$log"
		return 0
	fi
	cat "$log"
	if grep -q 'context deadline exceeded' "$log" && ! grep -q 'Failing input written' "$log"; then
		echo "fuzz: $1 $2 stopped late without a failing input; running it again"
		$go test -run '^$' -fuzz "^$2\$" -fuzztime "$fuzztime" "$1"
		return
	fi
	return 1
}

# go test -list prints each package's fuzz tests, then "ok  <package> ...".
$go test -list '^Fuzz' ./... | awk '
	/^Fuzz/ { names = names " " $1; next }
	/^ok/ { if (names != "") print $2 names; names = "" }
' | while read -r pkg names; do
	for name in $names; do
		echo "fuzz: $pkg $name for $fuzztime"
		fuzz "$pkg" "$name"
	done
done
