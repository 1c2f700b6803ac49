package main

import "github.com/exactlyonce/exactly/bench/internal/cpumeter"

type cpuSample = cpumeter.Sample

func (b *bench) sampleCPU() cpuSample { return cpumeter.Take(&b.pgBackends, "redis-server") }

func cpuNote(a, b cpuSample, cores int) string { return cpumeter.Note(a, b, cores, "redis-server") }
