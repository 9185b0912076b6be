#!/usr/bin/env bash
# Builds the simulated GPU as build.rs does (shared library, hidden visibility, one wrapper per
# kernels/*.cu found by the scan preprocessing) and runs its self-tests:
#   kernels/sim/selftest/run.sh [plain|asan|tsan|ucontext|all]   (default all: plain asan tsan)
# selftest: the simulator's own cases (test kernels + hand-written registry); realtest: the project's
# kernels against C++ references. Builds go to a temporary directory (KEEP=1 keeps it).
set -euo pipefail

root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
what=${1:-all}
case "$what" in
    all) flavors="plain asan tsan" ;;
    plain | asan | tsan | ucontext) flavors=$what ;;
    *) echo "usage: $0 [plain|asan|tsan|ucontext|all]" >&2; exit 2 ;;
esac

CXX=${CXX:-g++}
tmp=$(mktemp -d /tmp/sim_selftest.XXXXXX)
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$tmp"' EXIT; else echo "build directory: $tmp"; fi
jobs_max=$(nproc 2>/dev/null || echo 2)
base=(-std=c++17 -O2 -g -pthread -DSHARDTRAIN_SIM -I kernels -I kernels/sim/selftest -Wall -Wextra
      -Wno-unused-function -Wno-unknown-pragmas -Wno-unused-parameter)

# Wrapper TUs for kernels/*.cu and their registry, as build.rs generates them.
generate() {
    local gen=$1 modules=()
    mkdir -p "$gen"
    for cu in kernels/*.cu; do
        local name
        name=$(basename "$cu" .cu)
        modules+=("$name")
        local entries
        entries=$("$CXX" -E -x c++ -std=c++17 -DSHARDTRAIN_SIM -DSHARDTRAIN_SIM_SCAN -I kernels "$cu" |
            grep -o 'SHARDTRAIN_SIM_ENTRY_MARKER *void *[A-Za-z_0-9]*' | awk '{print $NF}')
        {
            echo "#include \"$name.cu\""
            echo "static const sim_kernel_entry ENTRIES[] = {"
            for e in $entries; do echo "    SIM_KERNEL_ENTRY($e),"; done
            echo "};"
            echo "extern \"C\" const sim_kernel_entry* shardtrain_sim_module_$name(int* count) {"
            echo "    *count = $(echo "$entries" | wc -w); return ENTRIES; }"
        } >"$gen/$name.sim.cpp"
    done
    {
        echo '#include "sim/registry.h"'
        for m in "${modules[@]}"; do echo "extern \"C\" const sim_kernel_entry* shardtrain_sim_module_$m(int* count);"; done
        echo "const sim_module SIM_MODULES[] = {"
        for m in "${modules[@]}"; do echo "    {\"$m\", shardtrain_sim_module_$m},"; done
        echo "};"
        echo "const int SIM_MODULE_COUNT = ${#modules[@]};"
        echo "const sim_kernel_resources SIM_RESOURCES[] = {{nullptr, 0, 0, 0}};"
        echo "const int SIM_RESOURCE_COUNT = 0;"
    } >"$gen/registry.cpp"
}

# compile OUT SRC FLAGS...: in the background, at most $jobs_max at a time.
compile() {
    local out=$1 src=$2
    shift 2
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 0.05; done
    "$CXX" "${base[@]}" "$@" -c "$src" -o "$out" 2>"$out.log" || { echo "compile failed: $src" >"$out.failed"; } &
}

summary=()
status=0
for flavor in $flavors; do
    case $flavor in
        plain) extra=() ;;
        asan) extra=(-fsanitize=address -fno-omit-frame-pointer) ;;
        tsan) extra=(-fsanitize=thread) ;;
        ucontext) extra=(-DSHARDTRAIN_SIM_UCONTEXT) ;;  # the portable context switch, on x86-64
    esac
    dir=$tmp/$flavor
    mkdir -p "$dir/obj"
    t0=$(date +%s.%N)
    generate "$dir/gen"
    lib=(-fPIC -fvisibility=hidden)
    runtime=()
    for src in kernels/sim/*.cpp; do
        obj=$dir/obj/$(basename "$src" .cpp).o
        runtime+=("$obj")
        compile "$obj" "$src" "${lib[@]}" "${extra[@]}"
    done
    compile "$dir/obj/selftest_registry.o" kernels/sim/selftest/selftest_registry.cpp "${lib[@]}" "${extra[@]}"
    real=()
    for src in "$dir"/gen/*.cpp; do
        obj=$dir/obj/gen_$(basename "$src" .cpp).o
        real+=("$obj")
        compile "$obj" "$src" "${lib[@]}" "${extra[@]}"
    done
    for t in test_exec test_runtime test_gemm test_real; do
        compile "$dir/obj/$t.o" "kernels/sim/selftest/$t.cpp" "${extra[@]}"
    done
    wait
    if ls "$dir"/obj/*.failed >/dev/null 2>&1; then
        cat "$dir"/obj/*.failed
        for f in "$dir"/obj/*.failed; do cat "${f%.failed}.log"; done
        exit 1
    fi
    cat "$dir"/obj/*.log | grep -E "warning|error" | head -20 || true
    "$CXX" -shared -pthread "${extra[@]}" "${runtime[@]}" "$dir/obj/selftest_registry.o" -o "$dir/libsim_selftest.so"
    "$CXX" -shared -pthread "${extra[@]}" "${runtime[@]}" "${real[@]}" -o "$dir/libsim_real.so"
    # Only the C interface may be exported.
    # (Weak instantiations of std templates keep libstdc++'s default visibility: not ours to hide.)
    leaked=$(nm -D --defined-only "$dir/libsim_real.so" | awk '{print $3}' |
        grep -v -E '^(sim_|_init$|_fini$|_ZN?K?St|_ZNSt|_ZNKSt|_ZT[ISV]N?St|_ZZNSt|_ZN9__gnu_cxx)' || true)
    if [ -n "$leaked" ]; then
        echo "[$flavor] symbols exported beyond sim_*:" $leaked
        status=1
    fi
    "$CXX" -pthread "${extra[@]}" "$dir/obj/test_exec.o" "$dir/obj/test_runtime.o" "$dir/obj/test_gemm.o" \
        -L"$dir" -lsim_selftest -Wl,-rpath,"$dir" -o "$dir/selftest"
    "$CXX" -pthread "${extra[@]}" "$dir/obj/test_real.o" -L"$dir" -lsim_real -Wl,-rpath,"$dir" -o "$dir/realtest"
    t1=$(date +%s.%N)
    echo "== $flavor: built in $(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s"
    rc=0
    "$dir/selftest" || rc=$?
    t2=$(date +%s.%N)
    "$dir/realtest" || rc=$?
    t3=$(date +%s.%N)
    [ $rc -eq 0 ] || status=1
    summary+=("$flavor: $([ $rc -eq 0 ] && echo passed || echo FAILED), selftest $(printf '%.1f' "$(echo "$t2 - $t1" | bc)") s, realtest $(printf '%.1f' "$(echo "$t3 - $t2" | bc)") s")
done
echo
for line in "${summary[@]}"; do echo "$line"; done
exit $status
