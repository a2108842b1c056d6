# Testbed.psm1: the host side of testbed's Hyper-V backend.
#
# Uploaded once per host (hash-checked) and imported by path for every call; each
# call passes its parameters as data (named parameters built from base64 JSON by
# testbed.transport.winrm), never as spliced PowerShell. Every function returns one
# object that testbed serializes with ConvertTo-Json. Windows PowerShell 5.1
# compatible: no ternary, no null-coalescing, no pipeline chain operators.
#
# Facts used here (see CONTEXT.md): WMI namespace root\virtualization\v2;
# ReloadManagementVtl returns 4096 with an Msvm_ConcreteJob (JobState 7 = completed);
# Options 0x1 = override version checks, 0x10 = disable NVMe keepalive.

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'

$script:Namespace = 'root\virtualization\v2'
$script:JobStarted = 4096
$script:JobCompleted = 7
$script:WorkerLog = 'Microsoft-Windows-Hyper-V-Worker-Admin'

function Get-TestbedVmSettings {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $vm = Get-CimInstance -Namespace $script:Namespace -ClassName Msvm_ComputerSystem -Filter "Name='$VmId'"
    if ($null -eq $vm) { throw "no Hyper-V VM with id $VmId" }
    Get-CimAssociatedInstance -InputObject $vm -ResultClassName Msvm_VirtualSystemSettingData |
        Where-Object { $_.VirtualSystemType -eq 'Microsoft:Hyper-V:System:Realized' }
}

function Test-TestbedVmId {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $parsed = [guid]::Empty
    if (-not [guid]::TryParse($VmId, [ref]$parsed)) { throw "not a VM id: $VmId" }
    $parsed.ToString()
}

function Get-TestbedPreflight {
    param()
    $os = Get-CimInstance -ClassName Win32_OperatingSystem
    $build = [int]$os.BuildNumber
    $isClient = ($os.ProductType -eq 1)
    if ($isClient) {
        $feature = Get-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V-All
        $hyperV = ($null -ne $feature -and $feature.State -eq 'Enabled')
        $featureFix = 'Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V-All'
    } else {
        $feature = Get-WindowsFeature -Name Hyper-V
        $hyperV = ($null -ne $feature -and $feature.Installed)
        $featureFix = 'Install-WindowsFeature -Name Hyper-V -IncludeManagementTools -Restart'
    }
    $key = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Virtualization'
    $allow = Get-ItemProperty -Path $key -Name AllowFirmwareLoadFromFile -ErrorAction SilentlyContinue
    [pscustomobject]@{
        Build                     = $build
        Edition                   = $(if ($isClient) { 'client' } else { 'server' })
        HyperV                    = $hyperV
        HyperVFix                 = $featureFix
        AllowFirmwareLoadFromFile = ($null -ne $allow -and $allow.AllowFirmwareLoadFromFile -eq 1)
        FreeMemoryMB              = [int]($os.FreePhysicalMemory / 1024)
        OpenHclSupported          = ($build -ge 26100)
        Com3Supported             = ($build -gt 26100)
    }
}

function New-TestbedVm {
    param(
        [Parameter(Mandatory = $true)][string]$Name,
        [Parameter(Mandatory = $true)][string]$IgvmPath,
        [Parameter(Mandatory = $true)][string]$VhdPath,
        [Parameter(Mandatory = $true)][string]$Owner,
        [int]$MemoryMB = 2048,
        [int]$ProcessorCount = 2,
        [string]$FirmwareCommandLine = '',
        [string]$Com1Pipe = '',
        [string]$Com3Pipe = ''
    )
    $vm = New-VM -Name $Name -Generation 2 -MemoryStartupBytes ([int64]$MemoryMB * 1048576) -VHDPath $VhdPath -GuestStateIsolationType OpenHCL
    Set-VM -VM $vm -ProcessorCount $ProcessorCount -Notes "testbed-owner=$Owner" -AutomaticCheckpointsEnabled $false
    Set-VMFirmware -VM $vm -EnableSecureBoot Off
    if ($Com1Pipe) { Set-VMComPort -VM $vm -Number 1 -Path "\\.\pipe\$Com1Pipe" }
    if ($Com3Pipe) {
        Set-VMComPort -VM $vm -Number 3 -Path "\\.\pipe\$Com3Pipe"
    }
    $vssd = Get-TestbedVmSettings -VmId $vm.Id.ToString()
    $vssd.GuestFeatureSet = 0x201
    $vssd.FirmwareFile = $IgvmPath
    $vssd.FirmwareParameters = [Text.Encoding]::UTF8.GetBytes($FirmwareCommandLine)
    $vssd.VMBusMessageRedirection = 1
    $vssd.TurnOffOnGuestRestart = $true
    $svc = Get-CimInstance -Namespace $script:Namespace -ClassName Msvm_VirtualSystemManagementService
    $text = $vssd | ConvertTo-CimEmbeddedString
    $r = Invoke-CimMethod -InputObject $svc -MethodName ModifySystemSettings -Arguments @{ SystemSettings = $text }
    if ($r.ReturnValue -eq $script:JobStarted) { $null = Wait-TestbedJob -JobPath $r.Job -TimeoutSeconds 60 }
    elseif ($r.ReturnValue -ne 0) { throw "ModifySystemSettings returned $($r.ReturnValue)" }
    [pscustomobject]@{ Name = $vm.Name; VmId = $vm.Id.ToString() }
}

function ConvertTo-CimEmbeddedString {
    param([Parameter(Mandatory = $true, ValueFromPipeline = $true)]$CimObject)
    $serializer = [Microsoft.Management.Infrastructure.Serialization.CimSerializer]::Create()
    $bytes = $serializer.Serialize($CimObject, [Microsoft.Management.Infrastructure.Serialization.InstanceSerializationOptions]::None)
    [Text.Encoding]::Unicode.GetString($bytes)
}

function Start-TestbedVm {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $id = Test-TestbedVmId -VmId $VmId
    Start-VM -VM (Get-VM -Id $id)
    [pscustomobject]@{ VmId = $id; State = (Get-VM -Id $id).State.ToString() }
}

function Get-TestbedIcStatus {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $id = Test-TestbedVmId -VmId $VmId
    $ic = Get-VMIntegrationService -VM (Get-VM -Id $id) -Name Shutdown
    [pscustomobject]@{ VmId = $id; Status = [string]$ic.PrimaryStatusDescription; Enabled = $ic.Enabled }
}

function Wait-TestbedJob {
    param([Parameter(Mandatory = $true)]$JobPath, [int]$TimeoutSeconds = 120)
    $watch = [Diagnostics.Stopwatch]::StartNew()
    while ($true) {
        $job = Get-CimInstance -InputObject $JobPath
        if ($job.JobState -eq $script:JobCompleted) {
            return [pscustomobject]@{ Done = $true; JobState = $job.JobState; ErrorCode = $job.ErrorCode; Ms = $watch.ElapsedMilliseconds }
        }
        if ($job.JobState -gt $script:JobCompleted) {
            return [pscustomobject]@{ Done = $true; JobState = $job.JobState; ErrorCode = $job.ErrorCode; ErrorDescription = $job.ErrorDescription; Ms = $watch.ElapsedMilliseconds }
        }
        if ($watch.Elapsed.TotalSeconds -gt $TimeoutSeconds) {
            return [pscustomobject]@{ Done = $false; JobState = $job.JobState; ErrorCode = $null; Ms = $watch.ElapsedMilliseconds }
        }
        Start-Sleep -Milliseconds 100
    }
}

function Invoke-TestbedRace {
    # The race, timed on the host: servicing (ReloadManagementVtl) at t = 0, the
    # shutdown through the IC at OffsetMs, then the servicing job is polled. The IC
    # state is sampled before and after the timed section, never inside it.
    param(
        [Parameter(Mandatory = $true)][string]$VmId,
        [double]$OffsetMs = 0,
        [int]$Options = 0,
        [int]$TimeoutHintSecs = 60,
        [bool]$Service = $true,
        [bool]$Shutdown = $true
    )
    $id = Test-TestbedVmId -VmId $VmId
    $vm = Get-CimInstance -Namespace $script:Namespace -ClassName Msvm_ComputerSystem -Filter "Name='$id'"
    $guestSvc = Get-CimInstance -Namespace $script:Namespace -ClassName Msvm_VirtualSystemGuestManagementService
    $shutdownIc = Get-CimAssociatedInstance -InputObject $vm -ResultClassName Msvm_ShutdownComponent
    $icBefore = [string](Get-VMIntegrationService -VM (Get-VM -Id $id) -Name Shutdown).PrimaryStatusDescription
    $clock = [Diagnostics.Stopwatch]::StartNew()
    $result = [ordered]@{ VmId = $id; IcBefore = $icBefore; OffsetMs = $OffsetMs; StartedUtc = [DateTime]::UtcNow.ToString('o') }
    $fire = {
        $t = $clock.Elapsed.TotalMilliseconds
        $r = Invoke-CimMethod -InputObject $shutdownIc -MethodName InitiateShutdown -Arguments @{ Force = $false; Reason = 'testbed' }
        $result.FireMs = $t
        $result.FireReturn = [int]$r.ReturnValue
    }
    if ($Shutdown -and $OffsetMs -lt 0) { & $fire }
    $job = $null
    if ($Service) {
        while ($Shutdown -and $OffsetMs -lt 0 -and $clock.Elapsed.TotalMilliseconds -lt $result.FireMs - $OffsetMs) { }
        $result.ServiceMs = $clock.Elapsed.TotalMilliseconds
        $r = Invoke-CimMethod -InputObject $guestSvc -MethodName ReloadManagementVtl -Arguments @{ VmId = $id; Options = [uint32]$Options; TimeoutHintSecs = [uint32]$TimeoutHintSecs }
        $result.ServiceReturnedMs = $clock.Elapsed.TotalMilliseconds
        $result.ServiceReturn = [int]$r.ReturnValue
        $job = $r.Job
    }
    if ($Shutdown -and $OffsetMs -ge 0) {
        $target = $result.ServiceMs + $OffsetMs
        $sleep = [int]($target - $clock.Elapsed.TotalMilliseconds - 2)
        if ($sleep -gt 0) { Start-Sleep -Milliseconds $sleep }
        while ($clock.Elapsed.TotalMilliseconds -lt $target) { }
        & $fire
    }
    if ($null -ne $job) {
        $j = Wait-TestbedJob -JobPath $job -TimeoutSeconds ($TimeoutHintSecs + 30)
        $result.JobDone = $j.Done
        $result.JobState = $j.JobState
        $result.JobErrorCode = $j.ErrorCode
        $result.ServiceDoneMs = $clock.Elapsed.TotalMilliseconds
    }
    $result.IcAfter = [string](Get-VMIntegrationService -VM (Get-VM -Id $id) -Name Shutdown).PrimaryStatusDescription
    [pscustomobject]$result
}

function Get-TestbedEvents {
    param([Parameter(Mandatory = $true)][string]$VmId, [Parameter(Mandatory = $true)][string]$SinceUtc)
    $id = Test-TestbedVmId -VmId $VmId
    $since = [DateTime]::Parse($SinceUtc).ToLocalTime()
    $events = Get-WinEvent -FilterHashtable @{ LogName = $script:WorkerLog; StartTime = $since } -ErrorAction SilentlyContinue |
        Where-Object { $_.Message -match $id -or $_.Properties.Value -contains $id }
    @($events | ForEach-Object {
            [pscustomobject]@{ Id = $_.Id; TimeUtc = $_.TimeCreated.ToUniversalTime().ToString('o'); Message = $_.Message }
        })
}

function Stop-TestbedVm {
    param([Parameter(Mandatory = $true)][string]$VmId, [bool]$TurnOff = $false)
    $id = Test-TestbedVmId -VmId $VmId
    $vm = Get-VM -Id $id
    if ($TurnOff) { Stop-VM -VM $vm -TurnOff -Force } else { Stop-VM -VM $vm -Force }
    [pscustomobject]@{ VmId = $id; State = (Get-VM -Id $id).State.ToString() }
}

function Remove-TestbedVm {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $id = Test-TestbedVmId -VmId $VmId
    $vm = Get-VM -Id $id -ErrorAction SilentlyContinue
    if ($null -eq $vm) { return [pscustomobject]@{ VmId = $id; Removed = $false } }
    if ($vm.State -ne 'Off') { Stop-VM -VM $vm -TurnOff -Force }
    Remove-VM -VM $vm -Force
    [pscustomobject]@{ VmId = $id; Removed = $true }
}

function Get-TestbedOwnedVm {
    # For `testbed gc --host`: the VMs whose Notes carry a testbed owner tag.
    param()
    @(Get-VM | ForEach-Object {
            if ($_.Notes -match 'testbed-owner=(\S+)') {
                [pscustomobject]@{ Name = $_.Name; VmId = $_.Id.ToString(); Owner = $Matches[1]; State = $_.State.ToString() }
            }
        })
}

$public = @(
    'Get-TestbedPreflight', 'New-TestbedVm', 'Start-TestbedVm', 'Get-TestbedIcStatus', 'Invoke-TestbedRace',
    'Get-TestbedEvents', 'Stop-TestbedVm', 'Remove-TestbedVm', 'Get-TestbedOwnedVm', 'Wait-TestbedJob'
)
Export-ModuleMember -Function $public
