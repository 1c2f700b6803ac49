package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
)

// buildInfo is what `exactly version` reports, from the binary's build
// information.
type buildInfo struct {
	Module, Version, Revision, Time, GoVersion string
	Modified                                   bool
}

func readBuildInfo() buildInfo {
	b := buildInfo{Module: "github.com/exactlyonce/exactly", Version: "unknown", GoVersion: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	if bi.Main.Path != "" {
		b.Module = bi.Main.Path
	}
	if bi.Main.Version != "" {
		b.Version = bi.Main.Version
	}
	if bi.GoVersion != "" {
		b.GoVersion = bi.GoVersion
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			b.Revision = s.Value
		case "vcs.time":
			b.Time = s.Value
		case "vcs.modified":
			b.Modified = s.Value == "true"
		}
	}
	return b
}

// versionLine is the one-line version: module version, revision and time,
// Go version.
func versionLine() string {
	b := readBuildInfo()
	var sb strings.Builder
	fmt.Fprintf(&sb, "exactly %s", b.Version)
	if b.Revision != "" {
		fmt.Fprintf(&sb, " (revision %s", b.Revision)
		if b.Modified {
			sb.WriteString(", modified")
		}
		if b.Time != "" {
			fmt.Fprintf(&sb, ", %s", b.Time)
		}
		sb.WriteString(")")
	}
	fmt.Fprintf(&sb, " %s %s/%s", b.GoVersion, runtime.GOOS, runtime.GOARCH)
	return sb.String()
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version, VCS revision and Go version of this binary",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			b := readBuildInfo()
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "exactly     %s\n", b.Version)
			fmt.Fprintf(out, "module      %s\n", b.Module)
			rev := b.Revision
			if rev == "" {
				rev = "unknown (built without VCS information)"
			} else if b.Modified {
				rev += " (modified)"
			}
			fmt.Fprintf(out, "revision    %s\n", rev)
			if b.Time != "" {
				fmt.Fprintf(out, "time        %s\n", b.Time)
			}
			fmt.Fprintf(out, "go          %s %s/%s\n", b.GoVersion, runtime.GOOS, runtime.GOARCH)
			return nil
		},
	}
}
