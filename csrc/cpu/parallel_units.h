// Work units on torch's intra-op threads. One parallel region per call, units claimed one at a
// time: a fork-join region per product and row pass (hundreds per step with vocabulary tiles) each
// waited for its slowest thread, so while another process held a core every region paid for a
// descheduled thread (the cpp backend took 2.3x the bare products and 1.75x the torch backend).
// Inside a unit torch's ops run on the calling thread (torch and MKL do not nest parallel regions).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace napo::cpu {

// torch's intra-op thread count, or 1 inside a torch parallel region (no nested teams).
inline int team_size() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// Calls fn(unit, slot) for every unit in [0, units) on at most `threads` threads of torch's pool
// (at::parallel_for: torch.set_num_threads holds, no second thread pool). `slot` in [0, threads)
// names the per-thread scratch a call may use; one slot never runs two units at once. Results must
// not depend on which thread runs a unit (each unit owns its outputs), so they are reproducible.
template <class Fn>
void for_each_unit(int64_t units, int threads, Fn&& fn) {
  const int64_t team = std::min<int64_t>(std::max(threads, 1), units);
  if (team <= 1) {
    for (int64_t u = 0; u < units; ++u) fn(u, 0);
    return;
  }
  // the workers start with default thread-local state: give them the caller's (grad mode off,
  // dispatch keys), so the products inside a unit dispatch as they would on this thread
  const at::ThreadLocalState state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, team, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t slot = begin; slot < end; ++slot)
      for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) fn(u, static_cast<int>(slot));
  });
}

}  // namespace napo::cpu
