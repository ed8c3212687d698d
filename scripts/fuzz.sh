#!/bin/sh
# Runs every fuzz test of the module, one after the other, for the time
# given as the first argument (a go test -fuzztime value such as 5s, 2m or
# 10000x; default 5s). The fuzz tests are found with go test -list, so a
# new one needs no entry here. A failing input is written under the
# package's testdata/fuzz/ and from then on runs with every go test.
set -eu

fuzztime=${1:-5s}
go=${GO:-go}

# go test -list prints each package's fuzz tests, then "ok  <package> ...".
$go test -list '^Fuzz' ./... | awk '
	/^Fuzz/ { names = names " " $1; next }
	/^ok/ { if (names != "") print $2 names; names = "" }
' | while read -r pkg names; do
	for name in $names; do
		echo "fuzz: $pkg $name for $fuzztime"
		$go test -run '^$' -fuzz "^$name\$" -fuzztime "$fuzztime" "$pkg"
	done
done
