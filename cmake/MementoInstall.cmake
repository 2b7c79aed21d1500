# Installation: public headers, the client library (shared libmemento.so and static libmemento.a,
# each self-contained), the binaries, the Protobuf schemas, mementoConfig.cmake (+ version file)
# exporting memento::client and memento::client_static, and memento.pc for pkg-config users.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(MEMENTO_SOVERSION 0)
set(_memento_parts memento_client memento_core memento_proto)

# Shared: the three internal archives (PIC) linked whole into one library.
add_library(memento_shared SHARED ${PROJECT_SOURCE_DIR}/cmake/empty.cc)
set(_memento_whole "-Wl,--whole-archive")
foreach(part ${_memento_parts})
  list(APPEND _memento_whole "$<TARGET_FILE:${part}>")
endforeach()
list(APPEND _memento_whole "-Wl,--no-whole-archive")
add_dependencies(memento_shared ${_memento_parts})
target_link_libraries(memento_shared PRIVATE ${_memento_whole} protobuf::libprotobuf memento_isal Threads::Threads
                      $<$<BOOL:${MEMENTO_WITH_CUDA}>:CUDA::cudart>
                      $<$<BOOL:${MEMENTO_WITH_NCCL}>:memento_nccl>)
target_link_options(memento_shared PRIVATE -Wl,--no-undefined)
set_target_properties(memento_shared PROPERTIES OUTPUT_NAME memento VERSION ${PROJECT_VERSION}
                      SOVERSION ${MEMENTO_SOVERSION})

# Static: the three archives merged into one libmemento.a.
set(_memento_static ${CMAKE_BINARY_DIR}/lib/libmemento.a)
set(_mri "create ${_memento_static}\n")
foreach(part ${_memento_parts})
  string(APPEND _mri "addlib $<TARGET_FILE:${part}>\n")
endforeach()
string(APPEND _mri "save\nend\n")
file(GENERATE OUTPUT ${CMAKE_BINARY_DIR}/memento_static.mri CONTENT "${_mri}")
add_custom_command(OUTPUT ${_memento_static}
  COMMAND ${CMAKE_COMMAND} -E remove -f ${_memento_static}
  COMMAND ${CMAKE_AR} -M < ${CMAKE_BINARY_DIR}/memento_static.mri
  DEPENDS ${_memento_parts} ${CMAKE_BINARY_DIR}/memento_static.mri
  COMMENT "Merging the client archives into libmemento.a")
add_custom_target(memento_static ALL DEPENDS ${_memento_static})

# What a static consumer must link besides libmemento.a.
set(MEMENTO_STATIC_DEPS "${Protobuf_LIBRARIES};${ISAL_LIBRARY}")
set(MEMENTO_PC_PRIVATE "-lprotobuf -lisal -lpthread")
if(MEMENTO_WITH_CUDA)
  string(APPEND MEMENTO_PC_PRIVATE " -L${CUDAToolkit_LIBRARY_DIR} -lcudart")
endif()
if(MEMENTO_WITH_NCCL)
  list(APPEND MEMENTO_STATIC_DEPS "${NCCL_LIBRARY}")
  string(APPEND MEMENTO_PC_PRIVATE " -lnccl")
endif()

install(TARGETS memento_shared LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES ${_memento_static} DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES snapshot/client.h snapshot/memento.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/memento/snapshot)
install(FILES core/status.h core/dtype.h core/shard.h core/reshard.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/memento/core)
install(FILES proto/memento.proto proto/checkpoint.proto DESTINATION ${CMAKE_INSTALL_DATADIR}/memento/proto)
foreach(bin memento memento-agent memento-run memento-bench memento-train-example)
  if(TARGET ${bin})
    install(TARGETS ${bin} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  endif()
endforeach()

configure_package_config_file(cmake/mementoConfig.cmake.in ${CMAKE_BINARY_DIR}/mementoConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/memento
  PATH_VARS CMAKE_INSTALL_INCLUDEDIR CMAKE_INSTALL_LIBDIR)
write_basic_package_version_file(${CMAKE_BINARY_DIR}/mementoConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${CMAKE_BINARY_DIR}/mementoConfig.cmake ${CMAKE_BINARY_DIR}/mementoConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/memento)
configure_file(cmake/memento.pc.in ${CMAKE_BINARY_DIR}/memento.pc @ONLY)
install(FILES ${CMAKE_BINARY_DIR}/memento.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
