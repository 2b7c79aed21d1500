// Isolation (issue #8): a client running as another user cannot reach an agent's socket or open
// its shared-memory slots; a client of another job, or with a wrong token, is refused; a job id
// cannot turn the checkpoint directory into a path outside the storage root. The other-user cases
// fork, drop to `nobody` with setresuid, and report what they saw through a pipe.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <grp.h>
#include <pwd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>

#include "core/file_system.h"
#include "integration/harness.h"
#include "proto/memento.pb.h"
#include "proto/wire.h"

namespace memento::testing {
namespace {

// Runs `body` in a child process as nobody; returns what it wrote (or why it could not run).
std::string AsNobody(const std::function<std::string()>& body) {
  const passwd* pw = ::getpwnam("nobody");
  if (pw == nullptr) return "no user nobody";
  const uid_t uid = pw->pw_uid;
  const gid_t gid = pw->pw_gid;
  int fds[2];
  if (::pipe(fds) != 0) return "pipe failed";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    std::string out;
    if (::setgroups(0, nullptr) != 0 || ::setresgid(gid, gid, gid) != 0 || ::setresuid(uid, uid, uid) != 0) {
      out = std::string("cannot become nobody: ") + std::strerror(errno);
    } else if (::geteuid() != uid) {
      out = "still uid " + std::to_string(::geteuid());
    } else {
      out = body();
    }
    (void)!::write(fds[1], out.data(), out.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string out;
  char buf[1024];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return out;
}

// Runs a shell command; its output, and its exit code in *rc.
std::string RunCommand(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return "popen failed";
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int st = ::pclose(p);
  *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

std::string NobodyUid() {
  const passwd* pw = ::getpwnam("nobody");
  return pw == nullptr ? "?" : std::to_string(pw->pw_uid);
}

// connect(2) to a Unix socket; "connected" or the errno text.
int ConnectUnix(const std::string& path, std::string* error) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    *error = std::strerror(errno);
    ::close(fd);
    return -1;
  }
  return fd;
}

class IsolationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root: the test drops to user nobody with setresuid";
    cluster_ = std::make_unique<AgentCluster>(UniqueJob("iso"), 1, std::vector<std::string>{"--token", "s3cret"});
    cluster_->Start();
  }
  // Registers one rank and captures one version, so that the agent holds slots.
  void HoldOneVersion() {
    auto c = cluster_->Connect(0, 1, 0, 0, "s3cret");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    RankState s(1, 100);
    ASSERT_TRUE(s.Register(c->get()).ok());
    s.Fill(0, 1);
    ASSERT_TRUE((*c)->Snapshot(1).ok());
    ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
    ASSERT_TRUE(WaitGloballyComplete(c->get(), 1));
  }

  std::unique_ptr<AgentCluster> cluster_;
};

TEST_F(IsolationTest, OtherUserCannotReachTheSocket) {
  struct stat st {};
  ASSERT_EQ(::stat(cluster_->Socket(0).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // Even with the directories open to everyone, the socket's mode stops the connect(2).
  ASSERT_EQ(::chmod(TestTmp().c_str(), 0711), 0);
  ASSERT_EQ(::chmod(cluster_->Dir().c_str(), 0711), 0);
  const std::string socket = cluster_->Socket(0);
  const std::string seen = AsNobody([&] {
    std::string error;
    const int fd = ConnectUnix(socket, &error);
    if (fd >= 0) ::close(fd);
    return fd >= 0 ? std::string("connected") : error;
  });
  EXPECT_EQ(seen, "Permission denied");
}

TEST_F(IsolationTest, OtherUserIsRefusedByPeerCredentials) {
  // With the file modes opened up, the agent's SO_PEERCRED check is what refuses the client.
  ASSERT_EQ(::chmod(TestTmp().c_str(), 0711), 0);
  ASSERT_EQ(::chmod(cluster_->Dir().c_str(), 0711), 0);
  ASSERT_EQ(::chmod(cluster_->Socket(0).c_str(), 0666), 0);
  const std::string socket = cluster_->Socket(0);
  const std::string job = cluster_->job();
  const std::string seen = AsNobody([&] {
    std::string error;
    const int fd = ConnectUnix(socket, &error);
    if (fd < 0) return "connect: " + error;
    proto::Request req;
    req.mutable_hello()->set_job_id(job);
    req.mutable_hello()->set_job_token("s3cret");
    (void)SendFrame(fd, req).ok();  // the agent may already have closed the connection
    proto::Reply reply;
    Status st = RecvFrame(fd, &reply);
    ::close(fd);
    if (!st.ok()) return "recv: " + st.ToString();
    if (!reply.has_error()) return std::string("accepted");
    return std::to_string(reply.error().code()) + " " + reply.error().message();
  });
  EXPECT_EQ(seen, std::to_string(static_cast<int>(StatusCode::kPermissionDenied)) + " the agent serves only uid 0; " +
                      "connection from uid " + NobodyUid() + " refused");
  EXPECT_TRUE(cluster_->LogHas("refused a connection from uid " + NobodyUid())) << cluster_->Log();
}

TEST_F(IsolationTest, OtherUserCannotOpenTheSlots) {
  HoldOneVersion();
  for (int k = 0; k < 2; ++k) {
    const std::string name = cluster_->SlotName(0, 0, k);
    struct stat st {};
    ASSERT_EQ(::stat(("/dev/shm" + name).c_str(), &st), 0) << name;
    EXPECT_EQ(st.st_mode & 0777, 0600u) << name;
    EXPECT_EQ(st.st_uid, 0u) << name;
    const std::string seen = AsNobody([&] {
      const int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
      if (fd >= 0) ::close(fd);
      return fd >= 0 ? std::string("opened") : std::string(std::strerror(errno));
    });
    EXPECT_EQ(seen, "Permission denied") << name;
  }
}

TEST_F(IsolationTest, ClientOfAnotherJobIsRefused) {
  auto c = cluster_->Connect(0, 1, 0, 0, "s3cret", "someone-else");
  EXPECT_EQ(c.status().code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(c.status().message(),
            "rank 0: client of job 'someone-else' refused by the agent of job '" + cluster_->job() + "'");
}

TEST_F(IsolationTest, WrongTokenIsRefused) {
  auto c = cluster_->Connect(0, 1, 0, 0, "guess");
  EXPECT_EQ(c.status().code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(c.status().message(), "rank 0: wrong job token for job '" + cluster_->job() + "'");
}

TEST_F(IsolationTest, OtherUserCannotReadTheCatalog) {
  HoldOneVersion();
  const std::string catalog = cluster_->CatalogDir(0);
  struct stat st {};
  ASSERT_EQ(::stat(catalog.c_str(), &st), 0) << catalog;
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  EXPECT_EQ(st.st_uid, 0u);
  // With the directories above it open to everyone, the catalog's own mode stops nobody.
  ASSERT_EQ(::chmod(TestTmp().c_str(), 0711), 0);
  ASSERT_EQ(::chmod(cluster_->Dir().c_str(), 0711), 0);
  const std::string seen = AsNobody([&] {
    DIR* d = ::opendir(catalog.c_str());
    if (d != nullptr) ::closedir(d);
    const std::string listed = d != nullptr ? "listed" : std::strerror(errno);
    const int fd = ::open((catalog + "/CURRENT").c_str(), O_RDONLY);
    if (fd >= 0) ::close(fd);
    return listed + "; " + (fd >= 0 ? std::string("opened") : std::string(std::strerror(errno)));
  });
  EXPECT_EQ(seen, "Permission denied; Permission denied");
}

// A directory for job data that someone else made first (a catalog or work directory under /tmp)
// is refused, not adopted: its owner could read or replace what the job writes there.
TEST_F(IsolationTest, DirectoryOfAnotherUserIsRefused) {
  const passwd* pw = ::getpwnam("nobody");
  ASSERT_NE(pw, nullptr);
  const std::string dir = cluster_->Dir() + "/planted";
  ASSERT_EQ(::mkdir(dir.c_str(), 0777), 0);
  ASSERT_EQ(::chown(dir.c_str(), pw->pw_uid, pw->pw_gid), 0);
  Status st = MakePrivateDir(dir, "catalog directory");
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(), "catalog directory " + dir + " belongs to uid " + NobodyUid() +
                              ", not to uid 0 that runs this job: refusing to keep job data there");
  // A link to a directory of this user is refused too: it could be swapped for another.
  const std::string mine = cluster_->Dir() + "/mine";
  const std::string link = cluster_->Dir() + "/link";
  ASSERT_EQ(::mkdir(mine.c_str(), 0700), 0);
  ASSERT_EQ(::symlink(mine.c_str(), link.c_str()), 0);
  st = MakePrivateDir(link, "work directory");
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(), "work directory " + link + " is a symbolic link: refusing to keep job data behind it");
  // A directory of this user that others may enter is closed.
  const std::string open_dir = cluster_->Dir() + "/open";
  ASSERT_EQ(::mkdir(open_dir.c_str(), 0755), 0);
  ASSERT_EQ(::chmod(open_dir.c_str(), 0755), 0);
  ASSERT_TRUE(MakePrivateDir(open_dir, "work directory").ok());
  struct stat sb {};
  ASSERT_EQ(::stat(open_dir.c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 07777, 0700u);
}

// The agent refuses such a catalog directory at start, naming it.
TEST_F(IsolationTest, AgentRefusesACatalogOfAnotherUser) {
  const passwd* pw = ::getpwnam("nobody");
  ASSERT_NE(pw, nullptr);
  const std::string dir = cluster_->Dir() + "/theirs";
  ASSERT_EQ(::mkdir(dir.c_str(), 0777), 0);
  ASSERT_EQ(::chown(dir.c_str(), pw->pw_uid, pw->pw_gid), 0);
  int rc = 0;
  const std::string out = RunCommand("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " + BinDir() +
                                         "/memento-agent --job theirs --socket " + cluster_->Dir() + "/theirs.sock --catalog " +
                                         dir + " 2>&1",
                                     &rc);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("catalog directory " + dir + " belongs to uid " + NobodyUid() +
                     ", not to uid 0 that runs this job: refusing to keep job data there"),
            std::string::npos)
      << out;
}

// memento-run's work directory holds the agents' log, the timeline and the simulated nodes'
// catalogs and sockets (under node-N/, which are 0700 too): only its user may enter it.
TEST_F(IsolationTest, LauncherWorkDirectoryIsPrivate) {
  const std::string work = cluster_->Dir() + "/run";
  int rc = 0;
  const std::string out = RunCommand("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " + BinDir() +
                                         "/memento-run --simulate-nodes 1 --ranks-per-node 1 --quiet --work-dir " + work +
                                         " -- true 2>&1",
                                     &rc);
  struct stat st {};
  ASSERT_EQ(::stat(work.c_str(), &st), 0) << out;
  EXPECT_EQ(st.st_mode & 07777, 0700u) << out;
  // Given a work directory of another user, memento-run stops before starting anything.
  const passwd* pw = ::getpwnam("nobody");
  ASSERT_NE(pw, nullptr);
  const std::string theirs = cluster_->Dir() + "/their-run";
  ASSERT_EQ(::mkdir(theirs.c_str(), 0777), 0);
  ASSERT_EQ(::chown(theirs.c_str(), pw->pw_uid, pw->pw_gid), 0);
  const std::string refused = RunCommand("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " + BinDir() +
                                             "/memento-run --simulate-nodes 1 --ranks-per-node 1 --quiet --work-dir " +
                                             theirs + " -- true 2>&1",
                                         &rc);
  EXPECT_NE(rc, 0) << refused;
  EXPECT_NE(refused.find("work directory " + theirs + " belongs to uid " + NobodyUid()), std::string::npos) << refused;
  EXPECT_FALSE(std::filesystem::exists(theirs + "/node-0")) << refused;
}

// The job id names the checkpoint directory (<storage>/<job>/step-N) and the shared-memory
// objects: "." or ".." would put checkpoints outside the job's directory.
TEST(JobIdTest, DotNamesAreRefused) {
  for (const std::string job : {"..", "."}) {
    const std::string cmd = BinDir() + "/memento-agent --job " + job + " --storage " + TestTmp() +
                            "/storage --socket " + TestTmp() + "/dot.sock --catalog " + TestTmp() + "/dot.catalog 2>&1";
    std::string out;
    FILE* p = ::popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    const int status = ::pclose(p);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << out;
    EXPECT_NE(out.find("job id '" + job + "' is not a name: it would put checkpoints outside the storage root"),
              std::string::npos)
        << out;
  }
}

}  // namespace
}  // namespace memento::testing
