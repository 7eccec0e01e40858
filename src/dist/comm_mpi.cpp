// The communicator over MPI (see moe/dist.h), through MPI's C interface.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "moe/dist.h"
#include "moe/error.h"

namespace moe::dist {

namespace {

bool g_started = false;  // this process called MPI_Init
int g_world_rank = 0;

// The watchdog: a thread that ends the process when one collective has waited too long, so that
// mpirun ends the job (a rank that died or hangs would otherwise stall the others forever).
std::atomic<const char*> g_waiting{nullptr};  // the collective this process is in, or null
std::atomic<int64_t> g_since_ms{0};
double g_timeout_s = 0;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void watchdog() {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const char* what = g_waiting.load();
    if (!what) continue;
    const double waited = static_cast<double>(now_ms() - g_since_ms.load()) / 1e3;
    if (waited > g_timeout_s) {
      std::fprintf(stderr,
                   "moe: error: [dist] rank %d waited %.0f s in %s for the other ranks: one of "
                   "them has died or hangs; ending the job\n",
                   g_world_rank, waited, what);
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
}

// mpirun ends the others with SIGTERM when one rank dies: say why before going.
void on_sigterm(int) {
  char msg[160];
  const int n = std::snprintf(msg, sizeof msg,
                              "moe: error: [dist] rank %d was stopped by mpirun: another rank of "
                              "the job has ended\n",
                              g_world_rank);
  if (n > 0) {
    const ssize_t w = ::write(2, msg, static_cast<size_t>(n));
    (void)w;
  }
  std::_Exit(3);
}

// Marks this process as waiting in a collective for the watchdog.
class Waiting {
 public:
  explicit Waiting(const char* what) {
    g_since_ms.store(now_ms());
    g_waiting.store(what);
  }
  ~Waiting() { g_waiting.store(nullptr); }
  Waiting(const Waiting&) = delete;
  Waiting& operator=(const Waiting&) = delete;
};

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw_error("dist",
              fmt::format("{} failed: {}", what, std::string(text, static_cast<size_t>(len))));
}

int to_int(int64_t v, const char* what) {
  MOE_CHECK(v >= 0 && v <= INT_MAX, "dist", "{} = {} does not fit an MPI count", what, v);
  return static_cast<int>(v);
}

}  // namespace

struct Comm::Impl {
  MPI_Comm comm = MPI_COMM_SELF;
  bool owned = false;
  mutable int64_t sent = 0;
  ~Impl() {
    int done = 0;
    MPI_Finalized(&done);
    if (owned && !done) MPI_Comm_free(&comm);
  }
};

bool built_with_mpi() { return true; }

bool launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_NTASKS"})
    if (std::getenv(v)) return true;
  return false;
}

void init(int* argc, char*** argv, double timeout_s) {
  if (g_started || !launched_by_mpirun()) return;
  int provided = 0;
  check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  g_started = true;
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_world_rank);
  std::atexit([] {
    int done = 0;
    MPI_Finalized(&done);
    if (!done) MPI_Finalize();
  });
  std::signal(SIGTERM, on_sigterm);
  if (const char* t = std::getenv("MOE_DIST_TIMEOUT")) timeout_s = std::atof(t);
  g_timeout_s = timeout_s;
  if (timeout_s > 0) std::thread(watchdog).detach();
}

bool initialized() { return g_started; }

void abort_job(const std::string& why, int code) {
  std::fprintf(stderr, "%s\n", why.c_str());
  std::fflush(stderr);
  if (g_started) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

Comm::Comm() : impl_(std::make_shared<Impl>()) {}

Comm Comm::world() {
  Comm c;
  if (!g_started) return c;
  c.impl_->comm = MPI_COMM_WORLD;
  MPI_Comm_rank(MPI_COMM_WORLD, &c.rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &c.size_);
  return c;
}

Comm Comm::split(int color, int key) const {
  Comm c;
  if (size_ == 1) return c;
  Waiting wait("MPI_Comm_split");
  check(MPI_Comm_split(impl_->comm, color, key, &c.impl_->comm), "MPI_Comm_split");
  c.impl_->owned = true;
  MPI_Comm_set_errhandler(c.impl_->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(c.impl_->comm, &c.rank_);
  MPI_Comm_size(c.impl_->comm, &c.size_);
  return c;
}

namespace {

// The sum over ranks of v [n], the same bits everywhere: rank q adds chunk q of every rank's
// values in rank order (in double), then every rank gathers the summed chunks.
template <class T>
void ordered_sum(MPI_Comm comm, int rank, int size, T* v, int64_t n) {
  const int64_t chunk = (n + size - 1) / size;
  auto lo = [&](int q) { return std::min<int64_t>(n, q * chunk); };
  auto len = [&](int q) { return lo(q + 1) - lo(q); };
  std::vector<int> sc(static_cast<size_t>(size)), sd(sc), rc(sc), rd(sc);
  const int mine = to_int(len(rank), "chunk");
  for (int q = 0; q < size; ++q) {
    sc[static_cast<size_t>(q)] = to_int(len(q), "chunk");
    sd[static_cast<size_t>(q)] = to_int(lo(q), "offset");
    rc[static_cast<size_t>(q)] = mine;
    rd[static_cast<size_t>(q)] = q * mine;
  }
  std::vector<T> parts(static_cast<size_t>(size) * static_cast<size_t>(mine));
  MPI_Datatype type = MPI_BYTE;
  MPI_Type_contiguous(static_cast<int>(sizeof(T)), MPI_BYTE, &type);
  MPI_Type_commit(&type);
  Waiting wait("a gradient or statistics sum");
  int rc1 =
      MPI_Alltoallv(v, sc.data(), sd.data(), type, parts.data(), rc.data(), rd.data(), type, comm);
  std::vector<T> summed(static_cast<size_t>(mine));
  for (int i = 0; i < mine; ++i) {
    double s = 0;
    for (int q = 0; q < size; ++q)
      s += static_cast<double>(parts[static_cast<size_t>(q * mine + i)]);
    summed[static_cast<size_t>(i)] = static_cast<T>(s);
  }
  int rc2 = rc1 == MPI_SUCCESS
                ? MPI_Allgatherv(summed.data(), mine, type, v, sc.data(), sd.data(), type, comm)
                : rc1;
  MPI_Type_free(&type);
  check(rc2, "the sum over ranks");
}

// int64 sums are exact in any order.
void exact_sum(MPI_Comm comm, int64_t* v, int64_t n) {
  Waiting wait("MPI_Allreduce");
  check(MPI_Allreduce(MPI_IN_PLACE, v, to_int(n, "count"), MPI_INT64_T, MPI_SUM, comm),
        "MPI_Allreduce");
}

}  // namespace

void Comm::sum(float* v, int64_t n) const {
  if (size_ > 1) ordered_sum(impl_->comm, rank_, size_, v, n);
}
void Comm::sum(double* v, int64_t n) const {
  if (size_ > 1) ordered_sum(impl_->comm, rank_, size_, v, n);
}
void Comm::sum(int64_t* v, int64_t n) const {
  if (size_ > 1) exact_sum(impl_->comm, v, n);
}
double Comm::sum(double v) const {
  sum(&v, 1);
  return v;
}
double Comm::max(double v) const {
  if (size_ == 1) return v;
  Waiting wait("MPI_Allreduce");
  check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, impl_->comm), "MPI_Allreduce");
  return v;
}

void Comm::alltoall(const int64_t* send, int64_t* recv, int64_t count) const {
  if (size_ == 1) {
    std::copy_n(send, count, recv);
    return;
  }
  Waiting wait("MPI_Alltoall");
  check(MPI_Alltoall(send, to_int(count, "count"), MPI_INT64_T, recv, to_int(count, "count"),
                     MPI_INT64_T, impl_->comm),
        "MPI_Alltoall");
}

void Comm::alltoallv(const void* send, const int64_t* send_counts, void* recv,
                     const int64_t* recv_counts, int64_t elem_bytes) const {
  const auto P = static_cast<size_t>(size_);
  std::vector<int> sc(P), sd(P), rc(P), rd(P);
  int64_t so = 0, ro = 0;
  for (size_t q = 0; q < P; ++q) {
    sc[q] = to_int(send_counts[q], "send count");
    sd[q] = to_int(so, "send offset");
    rc[q] = to_int(recv_counts[q], "receive count");
    rd[q] = to_int(ro, "receive offset");
    so += send_counts[q];
    ro += recv_counts[q];
  }
  if (size_ == 1) {
    if (so > 0) std::memcpy(recv, send, static_cast<size_t>(so * elem_bytes));
    return;
  }
  impl_->sent += (so - send_counts[static_cast<size_t>(rank_)]) * elem_bytes;
  MPI_Datatype type = MPI_BYTE;
  MPI_Type_contiguous(to_int(elem_bytes, "element size"), MPI_BYTE, &type);
  MPI_Type_commit(&type);
  int rc1 = MPI_SUCCESS;
  {
    Waiting wait("MPI_Alltoallv (tokens to and from their experts)");
    rc1 = MPI_Alltoallv(send, sc.data(), sd.data(), type, recv, rc.data(), rd.data(), type,
                        impl_->comm);
  }
  MPI_Type_free(&type);
  check(rc1, "MPI_Alltoallv");
}

void Comm::broadcast(void* data, int64_t bytes, int root) const {
  if (size_ == 1) return;
  Waiting wait("MPI_Bcast");
  check(MPI_Bcast(data, to_int(bytes, "bytes"), MPI_BYTE, root, impl_->comm), "MPI_Bcast");
}

void Comm::allgather(const void* send, void* recv, int64_t bytes) const {
  if (size_ == 1) {
    std::memcpy(recv, send, static_cast<size_t>(bytes));
    return;
  }
  Waiting wait("MPI_Allgather");
  check(MPI_Allgather(send, to_int(bytes, "bytes"), MPI_BYTE, recv, to_int(bytes, "bytes"),
                      MPI_BYTE, impl_->comm),
        "MPI_Allgather");
}

void Comm::barrier() const {
  if (size_ == 1) return;
  Waiting wait("MPI_Barrier");
  check(MPI_Barrier(impl_->comm), "MPI_Barrier");
}

int64_t Comm::alltoall_bytes_sent() const { return impl_->sent; }
void Comm::reset_counters() const { impl_->sent = 0; }

}  // namespace moe::dist
