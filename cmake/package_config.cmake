# The CMake package of the C++ API: `find_package(longreach)` gives the target
# longreach::longreach (liblongreach.so, the header, and Torch's libraries).
# Included by CMakeLists.txt after the install directories are set.
include(CMakePackageConfigHelpers)

# The one version source is python/longreach/__init__.py (pyproject.toml reads it too).
file(STRINGS "${CMAKE_CURRENT_SOURCE_DIR}/python/longreach/__init__.py" LONGREACH_VERSION_LINE
     REGEX "^__version__ *= *")
string(REGEX MATCH "[0-9]+(\\.[0-9]+)*" LONGREACH_VERSION "${LONGREACH_VERSION_LINE}")

configure_package_config_file(
  "${CMAKE_CURRENT_SOURCE_DIR}/cmake/longreachConfig.cmake.in"
  "${CMAKE_CURRENT_BINARY_DIR}/longreachConfig.cmake"
  INSTALL_DESTINATION "${LONGREACH_INSTALL_CMAKEDIR}"
  PATH_VARS LONGREACH_INSTALL_LIBDIR LONGREACH_INSTALL_INCLUDEDIR)
# SameMinorVersion: 0.x releases change the API between minor versions.
write_basic_package_version_file(
  "${CMAKE_CURRENT_BINARY_DIR}/longreachConfigVersion.cmake"
  VERSION "${LONGREACH_VERSION}" COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/longreachConfig.cmake"
              "${CMAKE_CURRENT_BINARY_DIR}/longreachConfigVersion.cmake"
        DESTINATION "${LONGREACH_INSTALL_CMAKEDIR}")
