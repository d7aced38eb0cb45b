// Package bench holds relay's benchmark harness: the load generator
// (bench/loadgen, bench/cmd/loadgen), the bare go-smtp sink it is compared
// with (bench/sink, bench/cmd/sink), the qmail-queue stand-in both hand mail
// to (bench/cmd/standin), the identity seeder (bench/cmd/seed) and the
// bench/run script that drives them. This package itself only has tests:
// Go benchmarks that need several of relay's packages, and a smoke test
// proving the harness works.
package bench
